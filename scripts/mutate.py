"""Mutation check: does the test suite catch deliberate bugs?

Each mutation replaces one short snippet of the code with a bug, in a scratch copy of the
repository (the checkout is never edited), runs the tests meant to catch it with that copy first
on PYTHONPATH, and the table says whether they failed, which test failed first, and, where the
equivalence sweep ran, the largest error it measured::

    python scripts/mutate.py                    # every mutation (about 15 minutes on 2 CPU cores)
    python scripts/mutate.py --only zero1-unbucketed-no-dp-all-reduce,bucket-order
    python scripts/mutate.py --list

Exit status 0 when every mutation was caught, 1 when one was not, 2 when a snippet no longer
occurs exactly once in its file (the code drifted: update the snippet).

Adding a mutation (a new parallel axis adds its own): append a ``Mutation`` to ``MUTATIONS`` with
a snippet short enough to survive unrelated edits, the bug as its replacement, and the tests that
must catch it (pytest arguments: files or node ids). Before the mutations run, the same tests run
on the unmutated copy and must pass (``--no-control`` skips that).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "tests/test_sharding.py"
BUCKETS = "tests/test_sharding.py::test_buckets_launch_during_backward"
PP_MEMORY_HAND = ("tests/test_cost.py::test_pipeline_activations_follow_each_stages_micro_"
                  "batches_in_flight")
PP_MEMORY = "tests/test_cost.py::test_memory_model_is_the_measured_live_peak_of_pipeline_stages"
LONG_ROWS = "tests/test_attention.py::test_long_rows_attend_blockwise_without_a_dense_mask"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...] = (SWEEP,)


MUTATIONS = [
    # --- ZeRO
    Mutation("zero1-unbucketed-no-dp-all-reduce", "evo/sharding/planner.py",
             'return {k: _zero_shard(comm.all_reduce(g, "dp"), layouts[k], mesh)',
             'return {k: _zero_shard(g, layouts[k], mesh)'),
    Mutation("zero-padding-before-the-data", "evo/sharding/planner.py",
             "return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])",
             "return torch.cat([x.new_zeros((rows - x.shape[0], *x.shape[1:])), x])"),
    Mutation("zero2-buckets-no-replica-all-reduce", "evo/sharding/planner.py",
             "flat = self.comm.all_reduce(flat, axis)", "flat = flat"),
    Mutation("bucket-order-forward", "evo/sharding/planner.py",
             "for k in reversed(names):", "for k in names:", (BUCKETS,)),
    # --- tensor and sequence parallelism
    Mutation("grad-norm-counts-tp-replicated-grads-tp-times", "evo/sharding/planner.py",
             'sq_split = comm.all_reduce(sq_split, "tp")\n',
             'sq_split = comm.all_reduce(sq_split, "tp")\n'
             '        sq_whole = comm.all_reduce(sq_whole, "tp")\n'),
    Mutation("sp-norm-grads-not-all-reduced", "evo/sharding/planner.py",
             'grads = {k: comm.all_reduce(g, "tp") if layouts[k].tp_dim is None else g',
             "grads = {k: g if layouts[k].tp_dim is None else g"),
    Mutation("vocab-parallel-ce-offset-by-one", "evo/sharding/planner.py",
             "local = labels - tp_index * width", "local = labels - tp_index * width + 1"),
    Mutation("tied-head-not-vocab-parallel", "evo/sharding/planner.py",
             "split = self.layouts[self.output].tp_dim == self.output_vocab_dim",
             "split = self.layouts[self.output].tp_dim == 1"),
    Mutation("row-parallel-exit-not-reduced", "evo/sharding/planner.py",
             'if self.sp else \\\n            C.reduce_from(x, self.comm, "tp")\n\n    def experts',
             'if self.sp else \\\n            C.copy_to(x, self.comm, "tp")\n\n    def experts'),
    Mutation("vocab-parallel-embedding-keeps-rows-above", "evo/sharding/planner.py",
             "outside = (local < 0) | (local >= rows)", "outside = local < 0"),
    # --- mixture of experts
    Mutation("moe-expert-load-not-summed-over-dp", "evo/sharding/planner.py",
             'aux = {**aux, **{k: comm.all_reduce(aux[k], "dp")', "aux = {**aux, **{k: aux[k]"),
    Mutation("moe-router-not-inside-the-region", "evo/models/moe.py",
             'logits = h @ regions.inside(p["moe.router"])', 'logits = h @ p["moe.router"]'),
    Mutation("moe-balancing-loss-without-its-coefficient", "evo/models/moe.py",
             "return self.coef * total if self.coef else", "return total if self.coef else",
             ("tests/test_moe.py",)),
    Mutation("moe-dispatch-unstable-sort", "evo/models/moe.py",
             "order = torch.argsort(flat, stable=True)", "order = torch.argsort(-flat).flip(0)",
             ("tests/test_moe.py",)),
    # --- expert parallelism
    Mutation("ep-expert-grads-summed-over-all-dp", "evo/sharding/planner.py",
             'g = comm.all_reduce(g, "edp" if expert else "dp")', 'g = comm.all_reduce(g, "dp")'),
    Mutation("ep-expert-buckets-summed-over-all-dp", "evo/sharding/planner.py",
             'dp_axis="edp") if comm.size', 'dp_axis="dp") if comm.size'),
    Mutation("ep-zero2-dense-buckets-not-summed-over-ep", "evo/sharding/planner.py",
             'replica_axes=("replica", "ep"))', 'replica_axes=("replica",))'),
    Mutation("ep-zero3-dense-grads-not-summed-over-ep", "evo/sharding/planner.py",
             'out[k] = g if expert else comm.all_reduce(g, "ep")', "out[k] = g"),
    Mutation("ep-received-rows-not-ungrouped", "evo/sharding/experts.py",
             "    y = _ungroup(y, order)\n", ""),
    Mutation("ep-grad-norm-counts-expert-shards-as-replicas", "evo/sharding/planner.py",
             "        copies //= plan.ep if lay.ep_dim is not None else 1\n", ""),
    Mutation("ep-checkpoint-writes-only-rank-0-experts", "evo/checkpoint.py",
             'return c["replica"] == 0 if sharded else c["edp"] == 0',
             'return c["replica"] == 0 if sharded else c["dp"] == 0'),
    # --- pipeline stages
    Mutation("pp-tied-grads-not-summed-over-stages", "evo/sharding/pipeline.py",
             'total = comm.all_reduce(g, "pp")', "total = g"),
    Mutation("pp-grad-norm-of-one-stage", "evo/sharding/pipeline.py",
             'return comm.all_reduce(local_norm(mine) ** 2, "pp").sqrt()',
             "return local_norm(mine)"),
    Mutation("pp-stage-boundary-shifted", "evo/sharding/pipeline.py",
             "out.append(blocks[i:i + c])", "out.append(blocks[max(i - 1, 0):i + c])"),
    Mutation("pp-loss-of-the-first-stage", "evo/sharding/planner.py",
             '("loss", "source_loss_sum", "source_tokens") if k in metrics}',
             '("source_loss_sum", "source_tokens") if k in metrics}'),
    Mutation("pp-input-grad-halved", "evo/sharding/pipeline.py",
             "(gx,) = torch.autograd.grad(out, [x], dout, retain_graph=True)",
             "(gx,) = torch.autograd.grad(out, [x], None if dout is None else dout * 0.5, "
             "retain_graph=True)"),
    # --- checkpoints
    Mutation("checkpoint-zero-padding-not-restored", "evo/checkpoint.py",
             "if sharded and t.shape[0] < lay.shard_shape[0]:", "if False:"),
    # --- packing
    Mutation("packing-cu-seqlens-shifted", "evo/data/packing.py",
             "bounds = np.concatenate([[0], np.cumsum(row_lengths)])",
             "bounds = np.concatenate([[0], np.cumsum(row_lengths) - (row_lengths > 1)])",
             ("tests/test_data_packing.py",)),
    Mutation("attention-crosses-documents", "evo_kernels/attention.py",
             "return (seg[:, None] == seg[None, :]) & visible(idx[:, None], idx[None, :], window)",
             "return visible(idx[:, None], idx[None, :], window)", ("tests/test_hf_reference.py",)),
    # --- long context (plan.sp, plan.cp)
    Mutation("sequence-group-grads-not-summed", "evo/sharding/planner.py",
             "            grads = context.reduce_over_sequence(grads, comm)\n",
             "            pass\n"),
    Mutation("ring-mask-document-start-shifted", "evo_kernels/attention.py",
             "& (k >= self.q_start[..., None])", "& (k >= self.q_start[..., None] - 1)",
             (SWEEP, "tests/test_context.py")),
    Mutation("sequence-positions-from-the-local-chunk", "evo/sharding/context.py",
             'out["positions"] = positions.index_select(-1, idx)',
             'out["positions"] = positions[..., :idx.numel()]'),
    Mutation("ulysses-kv-heads-replicated-in-the-wrong-order", "evo/sharding/context.py",
             "k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)",
             "k, v = k.repeat(1, 1, rep, 1), v.repeat(1, 1, rep, 1)"),
    Mutation("lse-merge-weights-the-new-block-wrongly", "evo_kernels/attention.py",
             "torch.exp(lse_i - new)[..., None]", "torch.exp(lse_i - lse)[..., None]",
             (SWEEP, "tests/test_context.py")),
    # --- weight parallelism (plan.weight_parallel): backward keeps each rank's own part of its
    # shard's gradient instead of reduce-scattering the gathered gradient over the group
    Mutation("wp-grads-not-reduce-scattered-over-the-sequence-group", "evo/sharding/planner.py",
             "return C.gather_from(w, self.comm, self.shard_axis, 0,",
             "return C._region(w, self.comm, self.shard_axis, 'all_gather', 'split' if "
             "self.plan.weight_parallel else 'reduce_scatter', 0, "
             "self.coords.get(self.shard_axis, 0),"),
    # --- plan cost model (evo/sharding/cost.py)
    Mutation("cost-all-reduce-moves-half", "evo/sharding/cost.py",
             '"all_reduce": (2 * (n - 1) / n, 2 * (n - 1)),',
             '"all_reduce": ((n - 1) / n, 2 * (n - 1)),', ("tests/test_cost.py",)),
    Mutation("cost-own-bytes-not-the-planners", "evo/sharding/cost.py",
             '    if modelled(cfg, plan) == "planner":\n        return planner_comm_bytes(',
             '    if False:\n        return planner_comm_bytes(', ("tests/test_cost.py",)),
    Mutation("cost-layered-misses-recomputation", "evo/sharding/cost.py",
             "a + micro_num * b + micro_num * t * c", "a + micro_num * b",
             ("tests/test_cost.py",)),
    Mutation("cost-pipeline-not-the-critical-rank", "evo/sharding/cost.py",
             "    return max(pp_ranks(cfg, plan, wl.remat), key=lambda r:",
             "    return min(pp_ranks(cfg, plan, wl.remat), key=lambda r:", ("tests/test_cost.py",)),
    Mutation("cost-pipeline-ranks-one-per-signature-wrong", "evo/sharding/cost.py",
             "                layers, redone, seen = layers + 1, redone + (seen < redo), seen + 1",
             "                layers, redone, seen = layers + 1, redone, seen + 1",
             ("tests/test_cost.py",)),
    # --- the sweep's premise: the mixture of experts' params bound sits above fp32 rounding
    # (AdamW's eps back at 1e-8 makes one fp32 process 6.2e-6 from fp64)
    Mutation("moe-sweep-adam-eps-at-the-fp32-floor", "tests/sweep_worker.py",
             'OPTIMIZERS = {"mixtral-odd": dataclasses.replace(OPT, eps=1e-6)}',
             'OPTIMIZERS = {"mixtral-odd": dataclasses.replace(OPT, eps=1e-8)}',
             ("tests/test_sharding.py::test_moe_sweep_sits_above_fp32_rounding",)),
    Mutation("pp-replay-ignores-the-inputs", "evo/sharding/pipeline.py",
             "start[a] = max([free[r]] + [done[n] for n in need])", "start[a] = free[r]",
             ("tests/test_pipeline.py::test_replay_of_1f1b_by_hand",
              "tests/test_pipeline.py::test_replayed_idle_equals_the_published_bubbles")),
    Mutation("pp-replay-input-grad-of-i-unknown", "evo/sharding/pipeline.py",
             'if a.kind == "I":                # the input gradient', "if False:  #",
             ("tests/test_pipeline.py::test_replayed_idle_equals_the_published_bubbles",)),
    Mutation("pp-hybrid-zero-shards-over-all-dp", "evo/sharding/layout.py",
             "shard[0] = math.ceil(local[0] / plan.zero_group)",
             "shard[0] = math.ceil(local[0] / plan.dp)",
             ("tests/test_pipeline.py::"
              "test_hybrid_zero_under_pp_shards_each_stage_inside_its_group",)),
    Mutation("pp-checkpoint-zero-shards-read-from-rank-0", "evo/checkpoint.py",
             'lo, hi = _rows_range(lay, plan, coords["seq" if plan.weight_parallel else "zero"])',
             "lo, hi = _rows_range(lay, plan, 0)",
             ("tests/test_pipeline.py::test_torchrun_pp2_dp2_matches_one_process_and_its_"
              "checkpoints_resume_across_plans",)),
    Mutation("pp-action-seconds-cumulative-wall-clock", "evo/sharding/pipeline.py",
             "self.seconds.append(time.thread_time() - c0 - (run.waited_cpu - w0))",
             "self.seconds.append(time.perf_counter() - t0)",
             ("tests/test_pipeline.py::"
              "test_executor_in_threads_equals_one_process_and_times_each_action",)),
    # --- blockwise attention with LSE (long rows on a CPU)
    Mutation("span-key-range-drops-the-diagonal", "evo_kernels/attention.py",
             "searchsorted(k, self.q_index.contiguous(), right=True)",
             "searchsorted(k, self.q_index.contiguous(), right=False)",
             (LONG_ROWS,)),
    Mutation("blockwise-keys-from-the-latest-row-start", "evo_kernels/attention.py",
             ".view(lo.shape[0], -1, block).amin((0, 2))",
             ".view(lo.shape[0], -1, block).amax((0, 2))",
             (LONG_ROWS,)),
    Mutation("blockwise-dk-overwritten-by-each-block", "evo_kernels/attention.py",
             "        dk[:, cols] += dk_i\n", "        dk[:, cols] = dk_i\n",
             (LONG_ROWS,)),
    Mutation("long-rows-keep-the-dense-mask", "evo_kernels/attention.py",
             "    if not dense_mask(total):\n", "    if False:\n", (LONG_ROWS,)),
    # --- evo sweep's measurement and plan list (evo/sweep.py), the memory model it checks
    Mutation("cost-update-coexists-with-activations", "evo/sharding/cost.py",
             "params + opt + cast + max(moments)", "params + opt + cast + sum(moments)",
             ("tests/test_cost.py",)),
    Mutation("cost-layer-forgets-rotary-q-k", "evo/sharding/cost.py",
             "(3 * h + 3 * kv + 4 * ffn) / plan.tp", "(h + 2 * kv + 4 * ffn) / plan.tp",
             ("tests/test_cost.py",)),
    Mutation("sweep-frees-of-the-profiled-threads-only", "evo/sweep.py",
             "with _frees_of_every_thread(), profile(", "with contextlib.nullcontext(), profile(",
             ("tests/test_sweep.py",)),
    Mutation("sweep-live-peak-counts-the-earlier-profiles", "evo/sweep.py",
             "return max(before + inside, default=base) - base",
             "return max(before + inside, default=base)", ("tests/test_sweep.py",)),
    Mutation("cost-pipeline-backward-without-its-gradients", "evo/sharding/cost.py",
             "{s: (0, 0, 0, 0, 0, grads[s], 0) for s in stages}", "None",
             (PP_MEMORY_HAND, PP_MEMORY)),
    Mutation("cost-pipeline-head-gradients-with-the-recompute", "evo/sharding/cost.py",
             "{s: ((0, 0, 0, int(per_stage[s][1] > 0), 0, 0, 0),\n                 (0, 0, 0, 0, per_stage[s][2], 0, 0))",
             "{s: ((0, 0, 0, int(per_stage[s][1] > 0), per_stage[s][2], 0, 0),)",
             (PP_MEMORY_HAND,)),
    Mutation("pipeline-input-backward-releases-the-forward", "evo/sharding/pipeline.py",
             'live[a.stage] += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0',
             'live[a.stage] += 1 if a.kind == "F" else -1 if a.kind in ("B", "I") else 0',
             ("tests/test_pipeline.py",)),
    Mutation("sweep-runs-only-dp-tp-zero", "evo/sweep.py",
             'if cost.modelled(cfg, p.plan) == "planner"]',
             'if cost.modelled(cfg, p.plan) == "planner" and p.plan.pp == 1]',
             ("tests/test_sweep.py",)),
    Mutation("calibrate-fit-in-absolute-error", "evo/calibrate.py",
             "w = [1 / max(t, 1e-12) ** 2 for _, t in points]", "w = [1.0 for _ in points]",
             ("tests/test_sweep.py",)),
    Mutation("cost-zero3-holds-gradient-buckets", "evo/sharding/cost.py",
             "and plan.dp > 1 and plan.zero < 3 and \\\n        not (plan.sequence_parallel",
             "and plan.dp > 1 and \\\n        not (plan.sequence_parallel",
             ("tests/test_cost.py",)),
    # --- ring attention's backward (context._Ring): the dk, dv accumulators left on the last
    # rank their block visited; each block's gradients from its own lse, not the merged one
    Mutation("ring-dkv-not-sent-home", "evo/sharding/context.py",
             "            dkv = wait_shift(sending)\n",
             "            dkv = dkv + 0 * wait_shift(sending)\n"),
    Mutation("ring-backward-uses-the-blocks-own-lse", "evo/sharding/context.py",
             "lse_grads(q, kv[0], kv[1], span, lse, g_out, row)",
             "lse_grads(q, kv[0], kv[1], span, attention_lse(q, kv[0], kv[1], span)[1], "
             "g_out, row)"),
    Mutation("cost-one-bucket-without-the-gradient-copies", "evo/sharding/cost.py",
             "copies = 1 + (wl.micro_num > 1) + (plan.zero == 2)", "copies = 1",
             ("tests/test_cost.py::"
              "test_memory_model_is_the_measured_live_peak_of_data_parallel_buckets",)),
    Mutation("calls-ulysses-qkv-in-one-all-to-all", "evo/sharding/context.py",
             "for h in (heads, kv_sent, kv_sent, heads):",
             "for h in (heads + kv_sent, kv_sent + heads):",
             ("tests/test_sharding.py::test_measured_collective_calls_equal_the_model",)),
    Mutation("calls-step-scalars-in-one-all-reduce", "evo/sharding/planner.py",
             "for nbytes in (8, 4, 8):", "for nbytes in (20,):",
             ("tests/test_sharding.py::test_measured_collective_calls_equal_the_model",)),
    Mutation("cost-ring-attention-at-sdpa-efficiency", "evo/sharding/cost.py",
             "    if plan.sp * plan.cp > 1:\n        return dev.get(",
             "    if plan.sp > 1:\n        return dev.get(",
             ("tests/test_cost.py::"
              "test_sequence_split_plans_run_the_context_attentions_efficiency",)),
    Mutation("cost-pipeline-compute-split-evenly", "evo/sharding/cost.py",
             "return sum(seconds[busiest]), span, whole, head_here",
             "return sum(sum(v) for v in seconds.values()) / len(seconds), span, whole, "
             "head_here",
             ("tests/test_cost.py::test_a_pipeline_step_takes_its_busiest_ranks_compute",)),
    Mutation("cost-zero-bubble-backward-once", "evo/sharding/cost.py",
             "return forward + recompute if stage > 0 else 0.0", "return 0.0",
             ("tests/test_cost.py::test_a_pipeline_step_takes_its_busiest_ranks_compute",)),
    Mutation("cost-pipeline-bubble-of-equal-stages", "evo/sharding/cost.py",
             "return span / busy - 1", "return pipeline_bubble_fraction(plan, wl.micro_num)",
             ("tests/test_cost.py::test_a_pipeline_step_takes_its_busiest_ranks_compute",)),
    Mutation("sweep-recalibrated-plan-predicted-from-the-first-profile", "evo/sweep.py",
             "    return statistics.median(seconds)\n", "    return seconds[0]\n",
             ("tests/test_sweep.py::test_recalibrated_plans_are_predicted_from_the_median_of_"
              "every_calibration",)),
    Mutation("sweep-recalibrated-launch-beside-the-wrong-profile", "evo/sweep.py",
             "each[i][r * len(chosen) + i]", "each[i][i]",
             ("tests/test_sweep.py::test_recalibrated_plans_are_predicted_from_the_median_of_"
              "every_calibration",)),
    Mutation("sweep-recalibrated-error-of-the-first-round", "evo/sweep.py",
             '"step_error": statistics.median(errors),', '"step_error": errors[0],',
             ("tests/test_sweep.py::test_recalibrated_rounds_each_compare_with_their_own_"
              "profile",)),
    Mutation("calibrate-timing-the-median-sample", "evo/calibrate.py",
             "    return min(samples)\n", "    return statistics.median(samples)\n",
             ("tests/test_sweep.py::test_a_timing_is_the_least_of_its_samples",)),
    Mutation("plan-sequence-split-by-tensor-parallelism-alone", "evo/sharding/plan.py",
             "return self.tp if self.sequence_parallel else 1",
             "return self.tp",
             ("tests/test_cost.py::test_norms_split_only_where_the_sequence_is_split",)),
    Mutation("cost-attention-scores-whole", "evo/sharding/cost.py",
             "models.flops_per_token(cfg, 0)) / 2\n",
             "models.flops_per_token(cfg, 0))\n",
             ("tests/test_cost.py::test_compute_time_is_flops_at_the_profiles_efficiency",)),
    Mutation("cost-attention-call-overhead-left-out", "evo/sharding/cost.py",
             "attention += wl.micro_num * layers * share", "attention += 0 * layers * share",
             ("tests/test_cost.py::test_the_attention_call_costs_its_overhead_per_layer_and_"
              "micro_batch",)),
    Mutation("calibrate-attention-rate-at-1024-tokens-alone", "evo/calibrate.py",
             'attn_rate = attn_fit["bandwidth_gbs"] * 1e9',
             "attn_rate = attention(1024) / attn[1024]",
             ("tests/test_sweep.py::test_a_layer_faster_than_the_matmul_timing_raises_the_peak",)),
    Mutation("cost-logits-charged-on-every-pipeline-rank", "evo/sharding/cost.py",
             "wl.micro_num, wl.seq_len, redo)[3]", "wl.micro_num, wl.seq_len, redo)[3] or True",
             ("tests/test_cost.py::test_the_loss_over_the_logits_is_charged_where_the_head_"
              "runs",)),
    Mutation("cost-logits-whole-under-tensor-parallelism", "evo/sharding/cost.py",
             "cfg.vocab_size / (plan.tp * plan.sp * plan.cp)",
             "cfg.vocab_size / (plan.sp * plan.cp)",
             ("tests/test_cost.py::test_the_loss_over_the_logits_is_charged_where_the_head_"
              "runs",)),
    Mutation("cost-accumulation-of-the-zero-shards", "evo/sharding/cost.py",
             'grads = rank_state(cfg, _unsharded(plan))["grads"]',
             'grads = rank_state(cfg, plan)["grads"]',
             ("tests/test_cost.py::test_the_micro_batches_gradients_are_summed_at_memory_"
              "bandwidth",)),
    Mutation("pipeline-gradient-sum-held-from-the-start", "evo/sharding/pipeline.py",
             "summing: set = set()", "summing: set = set(summed or ())",
             ("tests/test_pipeline.py::test_held_moments_count_the_gradient_sum_from_a_stages_"
              "first_weight_backward",
              "tests/test_cost.py::test_memory_model_is_the_measured_live_peak_of_pipeline_"
              "stages")),
    Mutation("cost-pipeline-gradient-sum-beside-every-moment", "evo/sharding/cost.py",
             "        accumulated = 0\n", "        accumulated = grads\n",
             ("tests/test_cost.py::test_memory_model_is_the_measured_live_peak_of_pipeline_"
              "stages",)),
    Mutation("cost-weight-parallel-layers-kept-whole", "evo/sharding/cost.py",
             "return layers if planner.stored_shard_axis(plan) else",
             "return layers if plan.zero == 3 else",
             ("tests/test_cost.py::test_memory_of_gathered_blocks_in_one_micro_batch_is_the_measured_"
              "live_peak",)),
    Mutation("cost-gradient-shards-beside-the-one-micro-batch", "evo/sharding/cost.py",
             "accumulated = grads if wl.micro_num > 1 else 0",
             "accumulated = grads if wl.micro_num > 1 or plan.zero == 3 else 0",
             ("tests/test_cost.py::test_memory_of_gathered_blocks_in_one_micro_batch_is_the_measured_"
              "live_peak",)),
    Mutation("cost-gathered-block-prefetched-and-its-gradient-in-backward", "evo/sharding/cost.py",
             "gather = largest * wl.act_bytes / 4 if planner.stored_shard_axis(plan) else 0",
             "gather = (2 * largest * wl.act_bytes / 4 + largest) if planner.stored_shard_axis("
             "plan) else 0",
             ("tests/test_cost.py::test_memory_of_gathered_blocks_in_one_micro_batch_is_the_measured_"
              "live_peak",)),
    Mutation("cost-sequence-plans-head-forward-only", "evo/sharding/cost.py",
             "head = local * sum(head_activation_bytes(cfg, plan, wl))",
             "head = local * (cfg.hidden_size + cfg.vocab_size // plan.tp) * wl.act_bytes",
             ("tests/test_cost.py::test_sequence_activations_are_the_context_models",)),
    Mutation("calibrate-collectives-after-10-ms-alone", "evo/calibrate.py",
             "**_mean_line(list(fits.values()))", "**fits[GAPS[-1]]",
             ("tests/test_sweep.py::test_collectives_are_charged_the_mean_of_their_fits_after_1_"
              "and_10_ms",)),
    Mutation("calibrate-layer-fit-with-its-norms", "evo/calibrate.py",
             "_layer_seconds(cfg, s, dtype) - attn[s] - norms[s])",
             "_layer_seconds(cfg, s, dtype) - attn[s])",
             ("tests/test_sweep.py::test_a_layer_faster_than_the_matmul_timing_raises_the_peak",)),
    Mutation("calibrate-layer-fit-with-its-attention", "evo/calibrate.py",
             "_layer_seconds(cfg, s, dtype) - attn[s] - norms[s])",
             "_layer_seconds(cfg, s, dtype) - norms[s])",
             ("tests/test_sweep.py::test_a_layer_faster_than_the_matmul_timing_raises_the_peak",)),
    Mutation("calibrate-efficiency-clipped-at-the-matmul-peak", "evo/calibrate.py",
             "peak = max(tflops * 1e12, rate, attn_rate, ctx_rate)", "peak = tflops * 1e12",
             ("tests/test_sweep.py::test_a_layer_faster_than_the_matmul_timing_raises_the_peak",)),
    Mutation("calibrate-collectives-keep-their-stalls", "evo/calibrate.py",
             "k = calls // 10", "k = 0",
             ("tests/test_sweep.py::test_collectives_are_timed_apart_and_averaged_without_"
              "their_extremes",)),
    Mutation("sweep-failed-launch-not-launched-again", "evo/sweep.py",
             "             tries: int = 2) -> dict:", "             tries: int = 1) -> dict:",
             ("tests/test_sweep.py::test_a_failed_launch_is_launched_once_more_then_raises",)),
    Mutation("sweep-step-time-the-median-step", "evo/sweep.py",
             'return {"step_seconds": min(timed),',
             'return {"step_seconds": statistics.median(timed),',
             ("tests/test_sweep.py::test_a_launchs_step_time_is_the_least_of_its_slowest_"
              "ranks_steps",)),
    Mutation("sweep-repeat-keeps-the-slowest-launch", "evo/sweep.py",
             'fastest = min(runs, key=lambda m: m["step_seconds"])',
             'fastest = max(runs, key=lambda m: m["step_seconds"])',
             ("tests/test_sweep.py::test_repeated_launches_count_their_least",)),
    Mutation("cost-micro-batch-end-without-its-own-gradients", "evo/sharding/cost.py",
             "return 2 * grads + (2 * first", "return grads + (2 * first",
             ("tests/test_cost.py::"
              "test_memory_of_gathered_blocks_peaks_when_a_micro_batch_backward_ends",)),
    Mutation("cost-micro-batch-end-with-one-micro-batch", "evo/sharding/cost.py",
             "wl.micro_num < 2 + _bucketed(plan)", "wl.micro_num < 1 + _bucketed(plan)",
             ("tests/test_cost.py::"
              "test_memory_of_gathered_blocks_peaks_when_a_micro_batch_backward_ends",)),
    # --- profiling
    Mutation("monitor-top-ops-least-time-first", "evo/monitor.py",
             "events.sort(key=lambda e: getattr(e, key), reverse=True)",
             "events.sort(key=lambda e: getattr(e, key))",
             ("tests/test_monitor.py::test_top_ops_ranks_self_time",)),
    Mutation("monitor-top-ops-total-time", "evo/monitor.py",
             'key = "self_device_time_total" if cuda else "self_cpu_time_total"',
             'key = "device_time_total" if cuda else "cpu_time_total"',
             ("tests/test_monitor.py::test_top_ops_ranks_self_time",)),
]


def copy_repo(dst: str) -> None:
    """The checkout's files as they are now (tracked and untracked, not ignored) into ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        src = os.path.join(REPO, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, f))


def check_snippets(mutations: list[Mutation]) -> list[str]:
    errors = []
    for m in mutations:
        n = open(os.path.join(REPO, m.file)).read().count(m.original)
        if n != 1:
            errors.append(f"mutation {m.name!r}: its snippet occurs {n} times in {m.file} "
                          f"(must be once): {m.original!r}")
    return errors


def run_tests(scratch: str, tests: tuple[str, ...]) -> tuple[int, str, dict | None]:
    """pytest on ``tests`` in the scratch copy: exit status, first failed test, sweep results."""
    sweep_out = os.path.join(scratch, "sweep-results.json")
    if os.path.exists(sweep_out):
        os.remove(sweep_out)
    path = [scratch] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "EVO_SWEEP_OUT": sweep_out,
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-p",
                        "no:cacheprovider", "-rfE", *tests], cwd=scratch, env=env, capture_output=True, text=True,
                       timeout=1800)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    sweep = json.load(open(sweep_out)) if os.path.exists(sweep_out) else None
    return r.returncode, failed[0] if failed else "", sweep


def error_size(sweep: dict | None, tests: tuple[str, ...]) -> str:
    """The sweep's largest update, loss and grad-norm errors over its fp32 plans (bf16 ones differ
    by rounding), and the checkpoints that differ."""
    if not sweep:
        return "the sweep's processes failed" if SWEEP in tests else ""
    plans = {n: r for n, r in sweep["plans"].items() if r["dtype"] == "float32"}
    out = []
    for key, label in (("update_rel", "update"), ("loss_rel", "loss"),
                       ("grad_norm_rel", "grad norm")):
        name = max(plans, key=lambda n: plans[n][key])
        out.append(f"{label} {plans[name][key]:.2g} ({name})")
    bad = [n for n, r in sweep["plans"].items() if not r["checkpoint_equal"]]
    if bad:
        out.append(f"checkpoint differs in {len(bad)} plans ({bad[0]}, ...)")
    return "; ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-control", action="store_true",
                    help="skip running the tests on the unmutated copy first")
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            print(f"mutate: error: unknown mutation {unknown[0]!r}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:48s} {m.file:28s} {' '.join(m.tests)}")
        return 0
    errors = check_snippets(chosen)
    if errors:
        print("mutate: error: the code drifted from the mutations:\n  " + "\n  ".join(errors),
              file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="evo-mutate-")
    try:
        copy_repo(scratch)
        if not args.no_control:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            rc, failed, _ = run_tests(scratch, tests)
            if rc != 0:
                print(f"mutate: error: the unmutated tests fail ({failed or f'exit {rc}'})",
                      file=sys.stderr)
                return 2
        rows = [run_mutation(scratch, m) for m in chosen]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(rows)
    return 0 if all(r[1] for r in rows) else 1


def run_mutation(scratch: str, m: Mutation) -> tuple[str, bool, str, str]:
    target = os.path.join(scratch, m.file)
    original = open(target).read()
    with open(target, "w") as f:
        f.write(original.replace(m.original, m.replacement))
    try:
        rc, failed, sweep = run_tests(scratch, m.tests)
    finally:
        with open(target, "w") as f:
            f.write(original)
    caught = rc == 1 and bool(failed)
    how = failed if caught else ("not caught" if rc == 0 else f"pytest exit {rc}")
    print(f"{m.name}: {'caught' if caught else 'NOT CAUGHT'} {how}", file=sys.stderr, flush=True)
    return m.name, caught, how, error_size(sweep, m.tests) if caught else ""


def print_table(rows) -> None:
    w = max(len(r[0]) for r in rows)
    print(f"| {'mutation':{w}s} | caught | first failing test | sweep's error |")
    print(f"|{'-' * (w + 2)}|--------|--------------------|---------------|")
    for name, caught, how, size in rows:
        print(f"| {name:{w}s} | {'yes' if caught else 'NO'} | {how} | {size} |")


if __name__ == "__main__":
    sys.exit(main())
