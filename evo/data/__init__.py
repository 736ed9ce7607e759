"""evo.data: InternEvo tokenized files, tokenizers, document packing and the resumable loader.

Data knows tokens, not models: nothing here imports the rest of evo. See docs/data.md.
"""

from .format import BinWriter, DataError, TokenizedDataset, format_lines, parse_line, write_bin
from .loader import EvalSet, Loader, Packed, eval_batches, parse_skip_batches
from .packing import IGNORE, pack_documents
from .tokenize import ByteTokenizer, build_stdlib_corpus, load_tokenizer, target_bytes, tokenize

__all__ = [
    "DataError",
    "TokenizedDataset",
    "BinWriter",
    "write_bin",
    "format_lines",
    "parse_line",
    "pack_documents",
    "IGNORE",
    "Packed",
    "Loader",
    "EvalSet",
    "eval_batches",
    "parse_skip_batches",
    "ByteTokenizer",
    "load_tokenizer",
    "tokenize",
    "build_stdlib_corpus",
    "target_bytes",
]
