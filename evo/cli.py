"""``evo`` command line: parsing only; the work is done by run.py and friends.

Bad input (a missing file, an unknown key, an invalid value) prints one paragraph naming the culprit
and exits with status 2; set ``EVO_DEBUG=1`` to see the traceback as well.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same shape and exit status as ours
        self.print_usage(sys.stderr)
        print(f"evo: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _train(args) -> None:
    import dataclasses

    from evo import config, run
    exp = config.apply_overrides(config.load(args.experiment), args.set)
    if getattr(args, "profile", None) is not None:
        try:
            exp = dataclasses.replace(exp, profile=args.profile)
        except config.ConfigError as e:
            raise config.ConfigError(f"--profile {args.profile}: {e}") from None
    run.run(exp)


def _generate(args) -> None:
    import torch

    from evo import generate
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, params, tok = generate.load_for_generation(args.source, args.tokenizer, device=device)
    params = {k: v.to(getattr(torch, args.dtype)) for k, v in params.items()}
    prompts = [tok.encode(p) for p in args.prompt]
    if args.bos and tok.bos_id is not None:
        prompts = [[tok.bos_id, *p] for p in prompts]
    outs = generate.generate(cfg, params, prompts, args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, stop_token=tok.eos_id)
    for i, (prompt, new) in enumerate(zip(args.prompt, outs)):
        if len(outs) > 1:
            print(f"--- [{i}]")
        print(prompt + tok.decode(new), flush=True)


def _tokenize(args) -> None:
    from evo.data.tokenize import tokenize
    summary = tokenize(args.inputs, args.out, tokenizer=args.tokenizer, field=args.field,
                                add_bos=args.bos, add_eos=args.eos, workers=args.workers,
                                progress=not args.quiet)
    print(summary)


def _plan(args) -> None:
    from evo import config
    from evo.sharding.simulate import plan_report, simulate
    exp = config.apply_overrides(config.load(args.experiment), args.set)
    if args.search:
        return _plan_search(args, exp)
    plans = [exp.plan] + [config.apply_overrides(exp, [f"plan.{kv}" for kv in spec.split(",")
                                                       if kv]).plan for spec in args.plans]
    tokens = exp.data.micro_batch * exp.data.seq_len
    print(f"per rank at world {args.world} ({exp.data.micro_num} micro-batches of {tokens} "
          f"tokens, bf16 activations, fp32 master):")
    print(plan_report(exp.model, plans, args.world, micro_num=exp.data.micro_num,
                      tokens_per_micro=tokens))
    if any(p.sp * p.cp > 1 for p in plans):
        from evo.sharding.simulate import long_context_report
        print(long_context_report(exp.model, plans, args.world))
    if exp.plan.pp > 1:
        from evo.sharding import pipeline
        print(f"pipeline stages of {exp.plan.pp_schedule} (per pp rank; activations: the layer "
              "inputs of the micro-batches in flight):")
        print(pipeline.format_report(pipeline.stage_report(
            exp.model, exp.plan.resolve(args.world), micro_num=exp.data.micro_num,
            tokens_per_micro=tokens)))
    r = simulate(exp.model, exp.plan, args.world)
    print(f"checked {r['plan']} on a fake process group of {args.world}: rank 0 holds "
          f"{r['bytes']['total'] / 2**30:.2f} GiB of params, grads and AdamW state")


def _plan_search(args, exp) -> None:
    """``evo plan --search``: every plan of the world ranked by predicted tokens/s per device."""
    import json
    import time

    from evo import sweep
    from evo.sharding import cost, search
    profile = cost.load_profile(args.profile)
    base = sweep.base_of(exp, args.world)
    start = time.perf_counter()
    result = search.search(exp.model, args.world, base, profile)
    took = time.perf_counter() - start
    print(f"{len(result.ranked)} plans fit {args.world} devices of {profile.name} "
          f"({result.considered} divide the world, {result.over_memory} over memory; "
          f"{base.rows} rows of {base.seq_len} tokens per step; searched in {took:.1f} s):")
    print(search.table(result, args.top))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"world": args.world, "profile": profile.name, "seconds": took,
                       "rows": base.rows, "seq_len": base.seq_len,
                       "plans": [p.as_dict() for p in result.ranked]}, f, indent=1)
        print(f"evo: wrote all {len(result.ranked)} plans to {args.json}")


def _calibrate(args) -> None:
    from evo import calibrate
    calibrate.calibrate(args.out, args.nproc)
    print(f"evo: wrote the profile of this machine ({args.nproc} processes) to {args.out}")


def _sweep(args) -> None:
    from evo import config, sweep
    exp = config.apply_overrides(config.load(args.experiment), args.set)
    sweep.sweep(exp, top=args.top, steps=args.steps, nproc=args.nproc, out=args.out,
                profile=args.profile, spread=args.spread, repeat=args.repeat,
                recalibrate=args.recalibrate)


def _export_hf(args) -> None:
    from evo import checkpoint
    from evo.config import ConfigError
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and not os.listdir(args.out)) \
            and not args.overwrite:
        raise ConfigError(f"{args.out}: already exists and is not empty; pass --overwrite to "
                          "replace it")
    src = checkpoint.export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"evo: wrote {args.out} from {src}")


def _export_orbax(args) -> None:
    from evo import orbax_io
    src = orbax_io.export(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"evo: wrote {args.out} from {src}")


def _import_hf(args) -> None:
    """Train an experiment starting from HF weights: `--set init_from=DIR` spelled as a command."""
    args.set = [*args.set, f"init_from={args.hf_dir}"]
    _train(args)


def _positive_int(text: str) -> int:
    """argparse type of a count such as ``--world``; argparse names the flag in the error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evo", description="evo: LLM training as pure functions.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train an experiment file")
    t.add_argument("experiment", help="an experiment file (Python) that defines `experiment`")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field by dotted key, e.g. --set plan.tp=2 --set steps=10")
    t.add_argument("--profile", metavar="START:END",
                   help="profile steps START..END (1-based) into RUN_DIR/profile")
    t.set_defaults(fn=_train)

    pl = sub.add_parser("plan", help="per-rank memory and communication of plans at a world size")
    pl.add_argument("experiment")
    pl.add_argument("--world", type=_positive_int, required=True, help="number of processes")
    pl.add_argument("--plans", nargs="*", default=[], metavar="dp=8,zero=1",
                    help="more plans to compare, as plan.KEY=VALUE lists without the prefix")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--search", action="store_true",
                    help="rank every plan that fits by predicted tokens/s per device")
    pl.add_argument("--profile", default="a800-80gb-roce",
                    help="device/cluster profile: a bundled name (a100-80gb-roce, a800-80gb-roce, "
                         "h100-80gb-ib, h200-141gb-ib) or a JSON file from evo calibrate")
    pl.add_argument("--json", metavar="OUT", help="with --search: write every plan to OUT")
    pl.add_argument("--top", type=_positive_int, default=10, help="rows of the table printed")
    pl.set_defaults(fn=_plan)

    c = sub.add_parser("calibrate", help="measure this machine into a profile (JSON)")
    c.add_argument("--out", required=True, help="the profile file to write")
    c.add_argument("--nproc", type=_positive_int, default=4,
                   help="processes measuring at once (the world size sweeps will use)")
    c.set_defaults(fn=_calibrate)

    w = sub.add_parser("sweep", help="run the best predicted plans and compare with measurement")
    w.add_argument("experiment")
    w.add_argument("--top", type=_positive_int, required=True, help="plans to run")
    w.add_argument("--steps", type=_positive_int, default=5, help="steps per plan")
    w.add_argument("--nproc", type=_positive_int, required=True, help="processes (torchrun)")
    w.add_argument("--out", required=True, help="folder for sweep.json and sweep.png")
    w.add_argument("--profile", default=None,
                   help="profile JSON (default: evo calibrate into OUT/profile.json first)")
    w.add_argument("--spread", action="store_true",
                   help="run plans spread over the ranking's plan kinds (ZeRO stage, tp, pp "
                        "schedule, sp, cp, ...) instead of its top")
    w.add_argument("--repeat", type=_positive_int, default=1,
                   help="launches per plan, in rounds over all the plans; the least counts")
    w.add_argument("--recalibrate", action="store_true",
                   help="measure this machine before every launch (no --profile): each "
                        "plan is predicted as the median of its predictions from all of them, "
                        "a plan's error is the median of its rounds'")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    w.set_defaults(fn=_sweep)

    e = sub.add_parser("export-hf", help="write a checkpoint's weights as an HF LLaMA directory")
    e.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint")
    e.add_argument("--out", required=True, help="output directory (safetensors + config.json)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    e.set_defaults(fn=_export_hf)

    o = sub.add_parser("export-orbax", help="write a checkpoint's params as an Orbax checkpoint "
                                            "for JAX (needs the orbax extra)")
    o.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint")
    o.add_argument("--out", required=True, help="output directory (items params/ and evo/)")
    o.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    o.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    o.set_defaults(fn=_export_orbax)

    i = sub.add_parser("import-hf", help="train an experiment starting from HF LLaMA weights")
    i.add_argument("hf_dir", help="an HF LLaMA or InternLM2 directory")
    i.add_argument("experiment", help="the experiment to train (its model must match)")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    i.set_defaults(fn=_import_hf)

    g = sub.add_parser("generate", help="continue prompts with a trained model (KV cache)")
    g.add_argument("source", help="a run directory, an evo checkpoint, or an HF LLaMA directory")
    g.add_argument("--prompt", action="append", required=True,
                   help="text to continue; repeat for a batch of prompts")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default=None,
                   help="override the tokenizer recorded with the run")
    g.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS to each prompt")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    g.set_defaults(fn=_generate)

    k = sub.add_parser("tokenize", help="tokenize JSONL or text files into evo/InternEvo .bin files")
    k.add_argument("inputs", nargs="+", help=".jsonl files (one document per line) or text files")
    k.add_argument("--out", required=True, help="output folder")
    k.add_argument("--tokenizer", default="byte",
                   help="'byte', an HF tokenizers .json file, or a sentencepiece .model file")
    k.add_argument("--field", default="text", help="JSONL field holding the text")
    k.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS to every document")
    k.add_argument("--eos", action="store_true", help="append the tokenizer's EOS to every document")
    k.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    k.set_defaults(fn=_tokenize)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from evo.config import ConfigError
    from evo.data import DataError
    from evo.checkpoint import CheckpointError
    from evo.orbax_io import OrbaxError
    from evo.run import DistributedFailure
    try:
        args.fn(args)
    except (ConfigError, DataError, CheckpointError, OrbaxError, ValueError, FileNotFoundError,
            DistributedFailure) as e:
        if os.environ.get("EVO_DEBUG"):
            traceback.print_exc()
        msg = str(e).strip() or type(e).__name__
        print(f"evo: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
