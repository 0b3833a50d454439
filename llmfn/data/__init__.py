"""Tokenizers, the prepare CLI's token bins, and the data modules the trainer consumes.

tok = load_tokenizer("runs/x/tokenizer")
data = build_data_module(config.data, seq_len=256, seed=0)

The names load on first use (`llmfn.lazy_exports`): config validation reads
`llmfn.data.tokenizer` without importing the data modules and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmfn.lazy_exports import lazy_exports

_EXPORTS = {  # name -> the module that defines it
    "prepare_bins": "llmfn.data.binarize",
    "BPETokenizer": "llmfn.data.bpe_tokenizer",
    "CharTokenizer": "llmfn.data.char_tokenizer",
    "MODULES": "llmfn.data.data_module",
    "DataModule": "llmfn.data.data_module",
    "build_data_module": "llmfn.data.data_module",
    "SFTDataModule": "llmfn.data.sft_module",
    "StdlibDataModule": "llmfn.data.stdlib_module",
    "stdlib_files": "llmfn.data.stdlib_module",
    "RegressionDataModule": "llmfn.data.synthetic_module",
    "SyntheticDataModule": "llmfn.data.synthetic_module",
    "TextDataModule": "llmfn.data.text_module",
    "TokenBinDataModule": "llmfn.data.token_bin_module",
    "TokenBins": "llmfn.data.token_bins",
    "Tokenizer": "llmfn.data.tokenizer",
    "build_tokenizer": "llmfn.data.tokenizer",
    "load_tokenizer": "llmfn.data.tokenizer",
}

if TYPE_CHECKING:
    from llmfn.data.binarize import prepare_bins
    from llmfn.data.bpe_tokenizer import BPETokenizer
    from llmfn.data.char_tokenizer import CharTokenizer
    from llmfn.data.data_module import MODULES, DataModule, build_data_module
    from llmfn.data.sft_module import SFTDataModule
    from llmfn.data.stdlib_module import StdlibDataModule, stdlib_files
    from llmfn.data.synthetic_module import RegressionDataModule, SyntheticDataModule
    from llmfn.data.text_module import TextDataModule
    from llmfn.data.token_bin_module import TokenBinDataModule
    from llmfn.data.token_bins import TokenBins
    from llmfn.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer


__all__ = [
    "MODULES",
    "BPETokenizer",
    "CharTokenizer",
    "DataModule",
    "RegressionDataModule",
    "SFTDataModule",
    "StdlibDataModule",
    "SyntheticDataModule",
    "TextDataModule",
    "TokenBinDataModule",
    "TokenBins",
    "Tokenizer",
    "build_data_module",
    "build_tokenizer",
    "load_tokenizer",
    "prepare_bins",
    "stdlib_files",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
