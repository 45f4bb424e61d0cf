"""Tokenisation into fixed-shape NumPy arrays.

Conventions (from "The N Implementation Details of RLHF with PPO", Huang et al.
2023, and "The N+ Implementation Details of RLHF with PPO: A Case Study on
TL;DR Summarization", Huang et al. 2024):
  - Prompts are LEFT padded so every prompt ends at the same column and
    generation appends at column P for the whole batch; over-long prompts are
    LEFT truncated, keeping the text closest to the reply.
  - Prompt + completion sequences (SFT, reward modelling) are RIGHT padded.
    Completions are never cut: one that does not fit is an error, or is dropped
    and counted with `drop_overlong=True`.
  - The pad token must differ from EOS: rewards and values are read at the EOS
    index and padded positions are masked, which is ambiguous if they share an id.
  - A prompt encodes to the same tokens in every encoding (PPO prompts, SFT and
    preference rows), so the policy samples from the prompts it was trained on.
    With `use_chat_template` prompts and replies are rendered through the
    tokenizer's chat template first (`rlhf_jax.data.chat`) and encoded without
    the tokenizer's special tokens (the template writes them, BOS included), as
    `apply_chat_template(tokenize=True)` does.

All arrays are int32 with 1 = real token in masks. Works with any
`transformers` tokenizer (PreTrainedTokenizerFast / TokenizersBackend).
"""

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from absl import logging
import numpy as np

from rlhf_jax.data import chat
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.loaders import PreferencePair


class EncodedPrompts(NamedTuple):
  """Left-padded prompts.

  Attributes:
    ids: int32 [N, P] token ids, `pad_token_id` on the left.
    mask: int32 [N, P], 1 on prompt tokens.
    num_truncated: how many prompts lost tokens to left truncation.
  """
  ids: np.ndarray
  mask: np.ndarray
  num_truncated: int


class EncodedCompletions(NamedTuple):
  """Right-padded prompt + completion sequences.

  Attributes:
    ids: int32 [M, L] token ids, prompt then completion (then EOS), then pad.
    attention_mask: int32 [M, L], 1 on prompt and completion tokens.
    completion_mask: int32 [M, L], 1 on completion tokens incl. the appended EOS.
    kept: int32 [M], the index into the inputs of each row (M < N after drops).
    num_dropped: examples dropped because the completion alone exceeds max_len.
    num_truncated: kept examples whose prompt was left-truncated.
  """
  ids: np.ndarray
  attention_mask: np.ndarray
  completion_mask: np.ndarray
  kept: np.ndarray
  num_dropped: int
  num_truncated: int


class EncodedPreferences(NamedTuple):
  """Chosen and rejected sequences of the same pairs, row-aligned.

  Each `*_ids` / `*_attention_mask` / `*_completion_mask` is int32 [M, L] as in
  `EncodedCompletions`; row m of chosen and rejected is pair `kept[m]`. A pair
  is dropped when either side's completion does not fit.
  """
  chosen_ids: np.ndarray
  chosen_attention_mask: np.ndarray
  chosen_completion_mask: np.ndarray
  rejected_ids: np.ndarray
  rejected_attention_mask: np.ndarray
  rejected_completion_mask: np.ndarray
  kept: np.ndarray
  num_dropped: int
  num_truncated: int


# JSON files a Hugging Face tokenizer directory may hold, and the files of its vocabulary.
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json")
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


def import_transformers():
  """The `transformers` module, imported without the advice it logs when torch is absent
  ("PyTorch was not found. Models won't be available ..."): rlhf_jax takes only tokenizers and
  configs from it, and its install has no torch. The switch that silences the advice is set
  for the import alone."""
  key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
  before = os.environ.get(key)
  os.environ[key] = "1"
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  finally:
    if before is None:
      del os.environ[key]
    else:
      os.environ[key] = before
  return transformers


def load_tokenizer(path: str) -> Any:
  """The transformers tokenizer saved in directory `path`, checked by `check_tokenizer`.

  A missing directory, a missing vocabulary or special-token file, and a truncated or corrupt
  JSON file each raise naming the file (transformers' own errors name neither).
  """
  auto_tokenizer = import_transformers().AutoTokenizer
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  for name in _TOKENIZER_JSON:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      try:
        with open(file, encoding="utf-8") as f:
          json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e}); the file is truncated or corrupt") from None
  if not any(os.path.isfile(os.path.join(path, f)) for f in _VOCAB_FILES):
    raise DataError(f"{path}: no tokenizer vocabulary (none of {', '.join(_VOCAB_FILES)})")
  if not any(os.path.isfile(os.path.join(path, f))
             for f in ("tokenizer_config.json", "special_tokens_map.json")):
    raise DataError(f"{os.path.join(path, 'tokenizer_config.json')}: missing (it names the pad "
                    "and EOS tokens)")
  try:
    tokenizer = auto_tokenizer.from_pretrained(path, trust_remote_code=False)
  except Exception as e:   # transformers raises many types, none naming the file
    raise DataError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
  check_tokenizer(tokenizer)
  return tokenizer


def check_tokenizer(tokenizer: Any) -> None:
  """Raises ValueError unless the tokenizer has a pad token distinct from its EOS token."""
  name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
  if tokenizer.eos_token_id is None:
    raise ValueError(f"tokenizer {name!r} has no eos_token; completions must end in EOS")
  if tokenizer.pad_token_id is None:
    raise ValueError(
        f"tokenizer {name!r} has no pad_token; add a dedicated one, e.g. "
        "tokenizer.add_special_tokens({'pad_token': '<pad>'}), and resize the embeddings")
  if tokenizer.pad_token_id == tokenizer.eos_token_id:
    raise ValueError(
        f"tokenizer {name!r}: pad_token_id == eos_token_id == {tokenizer.pad_token_id}; RLHF "
        "reads rewards at the EOS and masks padding, so pad must be a distinct token: add one "
        "with tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings")


def _token_lists(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
  return list(tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"])


def _render(tokenizer: Any, prompts: Sequence[str], replies: Sequence[Sequence[str]],
            use_chat_template: bool) -> tuple[list[str], list[list[str]], bool]:
  """(prompt texts, each side's reply texts, whether the prompts take the tokenizer's special
  tokens): as given (replies without special tokens, e.g. no BOS mid-row), or rendered through
  the chat template, which writes the special tokens itself."""
  if not use_chat_template:
    return list(prompts), [list(side) for side in replies], True
  heads = chat.render_prompts(tokenizer, prompts)
  return heads, [chat.render_replies(tokenizer, prompts, side, heads) for side in replies], False


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_prompt_len: int,
                   use_chat_template: bool = False) -> EncodedPrompts:
  """Tokenises prompts into left-padded, left-truncated int32 arrays of width `max_prompt_len`.

  Without a chat template the prompt is encoded with the tokenizer's special
  tokens (e.g. BOS). With `use_chat_template` it is rendered as the user turn (an
  HH dialogue as its turns) with the generation prompt (`chat.render_prompts`)
  and encoded without adding special tokens. Truncation keeps the last
  `max_prompt_len` tokens.

  Raises:
    ValueError: bad tokenizer (see `check_tokenizer`), no prompts, a prompt
      with no tokens, or `use_chat_template` on a tokenizer without a template.
    DataError: with `use_chat_template`, a prompt the template cannot render.
  """
  check_tokenizer(tokenizer)
  if max_prompt_len < 1:
    raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
  if not prompts:
    raise ValueError("no prompts to encode")
  texts, _, special = _render(tokenizer, prompts, (), use_chat_template)
  tokens = _token_lists(tokenizer, texts, add_special_tokens=special)
  ids = np.full((len(tokens), max_prompt_len), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(tokens), max_prompt_len), np.int32)
  num_truncated = 0
  for i, toks in enumerate(tokens):
    if not toks:
      raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
    num_truncated += len(toks) > max_prompt_len
    toks = toks[-max_prompt_len:]
    ids[i, max_prompt_len - len(toks):] = toks
    mask[i, max_prompt_len - len(toks):] = 1
  if num_truncated:
    logging.warning("encode_prompts: %d of %d prompts left-truncated to %d tokens",
                    num_truncated, len(tokens), max_prompt_len)
  return EncodedPrompts(ids, mask, int(num_truncated))


def _completion_tokens(tokenizer: Any, completions: Sequence[str],
                       append_eos: bool) -> list[list[int]]:
  eos = [tokenizer.eos_token_id] if append_eos else []
  tokens = [t + eos for t in _token_lists(tokenizer, completions, add_special_tokens=False)]
  for i, toks in enumerate(tokens):
    if not toks:
      raise ValueError(f"completion {i} ({completions[i]!r}) encodes to no tokens")
  return tokens


def _fits(completion_tokens: list[list[int]], max_len: int, drop_overlong: bool,
          what: str) -> np.ndarray:
  """Returns a bool [N] of completions that fit in max_len.

  Raises DataError on the first that does not, unless `drop_overlong`.
  """
  fits = np.array([len(t) <= max_len for t in completion_tokens], bool)
  if not drop_overlong and not fits.all():
    i = int(np.argmin(fits))
    raise DataError(
        f"example {i}: {what} has {len(completion_tokens[i])} tokens (EOS included) but "
        f"max_len is {max_len}; completions are never cut (raise max_len, or drop such "
        "examples with drop_overlong)")
  return fits


def _pack_right(prompt_tokens: Sequence[list[int]], completion_tokens: Sequence[list[int]],
                max_len: int,
                pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Right-pads prompt+completion rows, left-truncating each prompt to what the completion leaves.

  Returns ids, attention_mask, completion_mask and a bool [N] of truncated prompts.
  """
  n = len(prompt_tokens)
  ids = np.full((n, max_len), pad_id, np.int32)
  attention_mask = np.zeros((n, max_len), np.int32)
  completion_mask = np.zeros((n, max_len), np.int32)
  truncated = np.zeros((n,), bool)
  for i, (prompt, completion) in enumerate(zip(prompt_tokens, completion_tokens)):
    room = max_len - len(completion)
    truncated[i] = len(prompt) > room
    prompt = prompt[len(prompt) - room:] if len(prompt) > room else prompt
    end = len(prompt) + len(completion)
    ids[i, :end] = prompt + completion
    attention_mask[i, :end] = 1
    completion_mask[i, len(prompt):end] = 1
  return ids, attention_mask, completion_mask, truncated


def encode_prompt_completion(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                             max_len: int, append_eos: bool = True, drop_overlong: bool = False,
                             use_chat_template: bool = False) -> EncodedCompletions:
  """Tokenises (prompt, completion) pairs into right-padded int32 arrays of width `max_len`.

  Prompt and completion are tokenised separately (prompt with special tokens,
  completion without, EOS appended), as the policy sees them at generation
  time. Row layout: [prompt | completion | EOS | pad...]. With
  `use_chat_template` the prompt is `encode_prompts`' rendering and the
  completion the assistant turn the template writes for it
  (`chat.render_replies`), its end-of-turn token included, then one EOS. When
  the sum exceeds max_len the prompt is left-truncated; a completion (with EOS)
  longer than max_len raises DataError, or with `drop_overlong` the example is
  dropped and counted (`kept` maps rows back to inputs).

  Raises:
    DataError: an over-long completion without `drop_overlong`; with
      `use_chat_template`, an example the template cannot render as a prompt
      and its reply.
    ValueError: bad tokenizer, mismatched lengths, no examples, or all dropped.
  """
  check_tokenizer(tokenizer)
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
  if not prompts:
    raise ValueError("no examples to encode")
  texts, (completions,), special = _render(tokenizer, prompts, (completions,), use_chat_template)
  completion_tokens = _completion_tokens(tokenizer, completions, append_eos)
  fits = _fits(completion_tokens, max_len, drop_overlong, "completion")
  kept = np.flatnonzero(fits).astype(np.int32)
  if not kept.size:
    raise ValueError(f"all {len(prompts)} completions are longer than max_len {max_len}")
  prompt_tokens = _token_lists(tokenizer, [texts[i] for i in kept], add_special_tokens=special)
  ids, attention_mask, completion_mask, truncated = _pack_right(
      prompt_tokens, [completion_tokens[i] for i in kept], max_len, tokenizer.pad_token_id)
  num_truncated = int(truncated.sum())
  num_dropped = len(prompts) - kept.size
  if num_dropped or num_truncated:
    logging.warning("encode_prompt_completion: dropped %d of %d over-long examples; "
                    "left-truncated %d prompts", num_dropped, len(prompts), num_truncated)
  return EncodedCompletions(ids, attention_mask, completion_mask, kept, int(num_dropped),
                            int(num_truncated))


def encode_preferences(tokenizer: Any, pairs: Sequence[PreferencePair], max_len: int,
                       append_eos: bool = True, drop_overlong: bool = False,
                       use_chat_template: bool = False) -> EncodedPreferences:
  """Encodes chosen and rejected sides of preference pairs like `encode_prompt_completion`,
  `use_chat_template` included (where a pair with prompt "", neither a prompt field nor an HH
  dialogue, is refused: its reply would answer no user turn).

  Both sides of a pair share its prompt; a pair is dropped (with
  `drop_overlong`) when either completion does not fit, so row m of the chosen
  and rejected arrays is always the same pair `kept[m]`, as the Bradley-Terry
  loss -log sigmoid(r(chosen) - r(rejected)) (Ouyang et al. 2022) needs.
  `num_truncated` counts kept pairs whose prompt was cut on either side.
  """
  check_tokenizer(tokenizer)
  if not pairs:
    raise ValueError("no preference pairs to encode")
  texts, sides, special = _render(tokenizer, [p.prompt for p in pairs],
                                  ([p.chosen for p in pairs], [p.rejected for p in pairs]),
                                  use_chat_template)
  chosen, rejected = (_completion_tokens(tokenizer, side, append_eos) for side in sides)
  fits = (_fits(chosen, max_len, drop_overlong, "chosen completion")
          & _fits(rejected, max_len, drop_overlong, "rejected completion"))
  kept = np.flatnonzero(fits).astype(np.int32)
  if not kept.size:
    raise ValueError(f"all {len(pairs)} pairs have a completion longer than max_len {max_len}")
  prompt_tokens = _token_lists(tokenizer, [texts[i] for i in kept], add_special_tokens=special)
  c_ids, c_attn, c_comp, c_truncated = _pack_right(
      prompt_tokens, [chosen[i] for i in kept], max_len, tokenizer.pad_token_id)
  r_ids, r_attn, r_comp, r_truncated = _pack_right(
      prompt_tokens, [rejected[i] for i in kept], max_len, tokenizer.pad_token_id)
  num_truncated = int((c_truncated | r_truncated).sum())
  num_dropped = len(pairs) - kept.size
  if num_dropped or num_truncated:
    logging.warning("encode_preferences: dropped %d of %d over-long pairs; "
                    "left-truncated %d prompts", num_dropped, len(pairs), num_truncated)
  return EncodedPreferences(c_ids, c_attn, c_comp, r_ids, r_attn, r_comp, kept,
                            int(num_dropped), int(num_truncated))
