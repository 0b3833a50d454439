"""Tokenizers, the prepare CLI's token bins, and the data modules the trainer consumes.

tok = load_tokenizer("runs/x/tokenizer")
data = build_data_module(config.data, seq_len=256, seed=0)
"""

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
