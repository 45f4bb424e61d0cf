"""Prompts and replies rendered through the tokenizer's chat template (`use_chat_template`).

A prompt becomes the conversation it opens, rendered with the generation prompt appended, as
transformers renders it for generation (`apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`): one user message, or the turns of an Anthropic HH dialogue
("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:", Bai et al. 2022), so HH
pairs without a prompt field keep their earlier turns as turns. A reply (an SFT completion, a
pair's chosen or rejected) becomes the text the template writes for it as the assistant turn:
the conversation with the reply appended, less the rendered prompt. So the prompt part of an SFT,
reward or DPO row is the PPO prompt token for token, and the loss mask covers the assistant turn
as the template writes it, its own end-of-turn token included. The turn then ends in one EOS,
where rollouts stop and rewards are read: a template that writes the EOS itself (ChatML's
<|im_end|> as the tokenizer's EOS, Llama 2's `{{ eos_token }}`) does not get a second one, and
one whose end-of-turn token is another (Gemma's <end_of_turn>) keeps it before the EOS.

Message texts lose the whitespace at their ends, which plain-text datasets use only to join
prompt and completion (HH replies start with a space).
"""

import re
from collections.abc import Sequence
from typing import Any

from rlhf_jax.data.errors import DataError
from rlhf_jax.data.loaders import HH_ASSISTANT_MARKER

HH_HUMAN_MARKER = "\n\nHuman:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

Messages = list[dict[str, str]]


def has_chat_template(tokenizer: Any) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def check_chat_template(tokenizer: Any) -> None:
  """Raises ValueError unless `tokenizer` has a chat template to render with."""
  if not has_chat_template(tokenizer):
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ValueError(f"use_chat_template=True but tokenizer {name!r} has no chat_template")


def hh_turns(prompt: str) -> Messages | None:
  """The turns of an HH dialogue prompt before its final, empty "Assistant:" (the reply to
  generate), or None when `prompt` is not one: it must start with "Human:" and end with
  "\\n\\nAssistant:", whitespace at its ends aside."""
  text = "\n\n" + prompt.strip()
  if not text.startswith(HH_HUMAN_MARKER) or not text.endswith(HH_ASSISTANT_MARKER):
    return None
  parts = _HH_TURN.split(text)   # "", role, text, role, text, ..., "Assistant", ""
  return [{"role": _HH_ROLES[role], "content": content.strip()}
          for role, content in zip(parts[1:-2:2], parts[2:-2:2])]


def prompt_messages(prompt: str) -> Messages:
  """The conversation a prompt opens: its HH turns, or one user message.

  Raises DataError for an empty prompt: a chat needs the user turn the reply answers (a pair
  without a prompt field whose texts are not HH dialogues has none).
  """
  turns = hh_turns(prompt)
  if turns is not None:
    return turns
  if not prompt.strip():
    raise DataError("empty prompt: with use_chat_template a reply needs the user turn it "
                    "answers (a prompt field, or HH 'Human: ... Assistant:' dialogues)")
  return [{"role": "user", "content": prompt.strip()}]


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
  try:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
  except Exception as e:   # jinja2 errors and the template's own raise_exception
    raise DataError(f"the chat template cannot render {[m['role'] for m in messages]} "
                    f"({type(e).__name__}: {e})") from None


def render_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
  """Each prompt's conversation (`prompt_messages`) rendered with the generation prompt.

  Raises:
    ValueError: the tokenizer has no chat template.
    DataError: "example i: ..." for a prompt that is empty or that the template refuses.
  """
  check_chat_template(tokenizer)
  out = []
  for i, prompt in enumerate(prompts):
    try:
      out.append(_render(tokenizer, prompt_messages(prompt), add_generation_prompt=True))
    except DataError as e:
      raise DataError(f"example {i}: {e}") from None
  return out


def _reply_turn(tokenizer: Any, prompt: str, reply: str, head: str) -> str:
  if hh_turns(prompt) is not None and HH_HUMAN_MARKER in reply:
    raise DataError("the reply continues the HH dialogue past its assistant turn ('Human:' "
                    "after it); with use_chat_template a reply is one assistant turn: drop "
                    "such pairs, or give the later turns in the prompt")
  full = _render(tokenizer, prompt_messages(prompt) + [
      {"role": "assistant", "content": reply.strip()}], add_generation_prompt=False)
  if not full.startswith(head):
    raise DataError(f"the chat template renders the conversation with its reply as "
                    f"{full[:len(head) + 20]!r}..., which does not start with the prompt as "
                    f"rendered for generation, {head!r}: the policy would be trained on "
                    "another prompt than it samples from")
  # The policy's turn ends at EOS: the separator after the turn is the next turn's, and a
  # template's own EOS (`{{ eos_token }}`, or an end-of-turn token that is the tokenizer's EOS)
  # is the one the encoder appends; a space before it is not the policy's to generate.
  turn = full[len(head):].rstrip()
  eos = tokenizer.eos_token
  return turn[:-len(eos)].rstrip() if eos and turn.endswith(eos) else turn


def render_replies(tokenizer: Any, prompts: Sequence[str], replies: Sequence[str],
                   heads: Sequence[str]) -> list[str]:
  """The assistant turn the template writes for each reply to its prompt (`heads`: the prompts
  as `render_prompts` renders them), up to and without a final EOS, which the encoder appends
  (so a turn ends in exactly one EOS whether or not the template writes it).

  Raises DataError "example i: ..." when the template renders a conversation that does not
  start with its rendered prompt, or an HH reply holds further turns.
  """
  out = []
  for i, (prompt, reply, head) in enumerate(zip(prompts, replies, heads, strict=True)):
    try:
      out.append(_reply_turn(tokenizer, prompt, reply, head))
    except DataError as e:
      raise DataError(f"example {i}: {e}") from None
  return out
