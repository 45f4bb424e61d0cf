"""Data layer: loaders, tokenisation, prompt batching and the embedded default task."""

from rlhf_jax.data.errors import DataError
from rlhf_jax.data.iterator import PromptIterator
from rlhf_jax.data.loaders import detect_format
from rlhf_jax.data.loaders import HH_ASSISTANT_MARKER
from rlhf_jax.data.loaders import load_preferences
from rlhf_jax.data.loaders import load_prompts
from rlhf_jax.data.loaders import load_sft
from rlhf_jax.data.loaders import PreferencePair
from rlhf_jax.data.loaders import SFTExample
from rlhf_jax.data.loaders import split_hh_prefix
from rlhf_jax.data.loaders import write_jsonl
from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.data.synthetic import DefaultTask
from rlhf_jax.data.synthetic import DefaultTaskFiles
from rlhf_jax.data.synthetic import gold_score
from rlhf_jax.data.synthetic import label_pairs
from rlhf_jax.data.synthetic import make_default_task
from rlhf_jax.data.synthetic import vocabulary
from rlhf_jax.data.synthetic import write_default_task
from rlhf_jax.data.tokenize import check_tokenizer
from rlhf_jax.data.tokenize import encode_preferences
from rlhf_jax.data.tokenize import encode_prompt_completion
from rlhf_jax.data.tokenize import encode_prompts
from rlhf_jax.data.tokenize import EncodedCompletions
from rlhf_jax.data.tokenize import EncodedPreferences
from rlhf_jax.data.tokenize import EncodedPrompts
