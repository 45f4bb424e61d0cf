"""Tests for rlhf_jax.data.tokenize against per-row Python reference encodings."""

import subprocess
import sys

import numpy as np
import pytest
import tiny_ppo
import transformers

from rlhf_jax import data


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("tok"))
  data.build_tokenizer(data.vocabulary(), out_dir)
  return out_dir


@pytest.fixture
def tok(tok_dir):
  # A fresh copy per test, so tests may change its special tokens or template.
  return transformers.AutoTokenizer.from_pretrained(tok_dir)


def _ref_left(tok, prompts, width):
  """Reference: one `encode` per prompt, keep the last `width` ids, pad on the left."""
  ids, mask, truncated = [], [], 0
  for p in prompts:
    t = tok.encode(p)
    truncated += len(t) > width
    t = t[-width:]
    ids.append([tok.pad_token_id] * (width - len(t)) + t)
    mask.append([0] * (width - len(t)) + [1] * len(t))
  return np.array(ids), np.array(mask), truncated


def _ref_right(tok, prompt, completion, width, append_eos=True):
  """Reference row: [prompt tail | completion | eos | pad], masks as lists."""
  c = tok.encode(completion, add_special_tokens=False) + ([tok.eos_token_id] if append_eos else [])
  p = tok.encode(prompt)
  p = p[max(0, len(p) - (width - len(c))):]
  pad = width - len(p) - len(c)
  return (p + c + [tok.pad_token_id] * pad, [1] * (len(p) + len(c)) + [0] * pad,
          [0] * len(p) + [1] * len(c) + [0] * pad)


PROMPTS = ["note : the lamp in the park looked",
           "review : my aunt thought the film at the cafe was very",
           "diary : this morning i felt"]


class TestEncodePrompts:

  @pytest.mark.parametrize("width", [4, 9, 16])
  def test_matches_reference(self, tok, width):
    out = data.encode_prompts(tok, PROMPTS, width)
    ref_ids, ref_mask, ref_truncated = _ref_left(tok, PROMPTS, width)
    assert out.ids.dtype == np.int32 and out.mask.dtype == np.int32
    assert out.ids.shape == (3, width)
    np.testing.assert_array_equal(out.ids, ref_ids)
    np.testing.assert_array_equal(out.mask, ref_mask)
    assert out.num_truncated == ref_truncated

  def test_truncation_keeps_end(self, tok):
    out = data.encode_prompts(tok, PROMPTS[:1], 3)
    assert tok.decode(out.ids[0]) == "the park looked"
    assert out.num_truncated == 1

  def test_no_truncation_padding(self, tok):
    out = data.encode_prompts(tok, ["diary : this morning i felt"], 8)
    np.testing.assert_array_equal(out.mask[0], [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(out.ids[0, :2], [0, 0])
    assert out.num_truncated == 0

  def test_chat_template(self, tok):
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}note :{% endif %}")
    out = data.encode_prompts(tok, PROMPTS, 20, use_chat_template=True)
    ref_ids, ref_mask, _ = _ref_left(tok, [p + " note :" for p in PROMPTS], 20)
    np.testing.assert_array_equal(out.ids, ref_ids)
    np.testing.assert_array_equal(out.mask, ref_mask)

  def test_chat_template_missing(self, tok):
    with pytest.raises(ValueError, match="has no chat_template"):
      data.encode_prompts(tok, PROMPTS, 8, use_chat_template=True)

  def test_pad_equal_eos_rejected(self, tok):
    tok.pad_token = data.synthetic.EOS_TOKEN
    with pytest.raises(ValueError, match="pad_token_id == eos_token_id == 1"):
      data.encode_prompts(tok, PROMPTS, 8)

  def test_missing_pad_rejected(self, tok):
    tok.pad_token = None
    with pytest.raises(ValueError, match="has no pad_token"):
      data.encode_prompts(tok, PROMPTS, 8)

  def test_prompt_without_tokens(self, tok):
    with pytest.raises(ValueError, match="prompt 1 .* encodes to no tokens"):
      data.encode_prompts(tok, ["note", "   "], 8)


SFT_PROMPTS = ["note : the lamp in the park looked",
               "review : my aunt thought the film at the cafe was",
               ""]
SFT_COMPLETIONS = ["very nice .",
                   "dull , but the plot was great !",
                   "red"]


class TestEncodePromptCompletion:

  @pytest.mark.parametrize("width,append_eos", [(20, True), (12, True), (9, False)])
  def test_matches_reference(self, tok, width, append_eos):
    out = data.encode_prompt_completion(tok, SFT_PROMPTS, SFT_COMPLETIONS, width,
                                        append_eos=append_eos)
    for i, (p, c) in enumerate(zip(SFT_PROMPTS, SFT_COMPLETIONS)):
      ids, attn, comp = _ref_right(tok, p, c, width, append_eos)
      np.testing.assert_array_equal(out.ids[i], ids)
      np.testing.assert_array_equal(out.attention_mask[i], attn)
      np.testing.assert_array_equal(out.completion_mask[i], comp)
    for a in (out.ids, out.attention_mask, out.completion_mask):
      assert a.dtype == np.int32 and a.shape == (3, width)
    np.testing.assert_array_equal(out.kept, [0, 1, 2])
    assert out.num_dropped == 0
    n_prompt = [len(tok.encode(p)) for p in SFT_PROMPTS]
    n_completion = [len(tok.encode(c)) + append_eos for c in SFT_COMPLETIONS]
    assert out.num_truncated == sum(p + c > width for p, c in zip(n_prompt, n_completion))

  def test_eos_inside_completion_mask(self, tok):
    out = data.encode_prompt_completion(tok, ["note : the lamp looked"], ["nice ."], 10)
    last = int(out.attention_mask[0].sum()) - 1
    assert out.ids[0, last] == tok.eos_token_id
    assert out.completion_mask[0, last] == 1
    assert tok.decode(out.ids[0][out.completion_mask[0] == 1]) == "nice . <eos>"

  def test_overlong_completion_raises(self, tok):
    with pytest.raises(data.DataError, match=r"example 1: completion has 9 tokens .* max_len is 8"):
      data.encode_prompt_completion(tok, SFT_PROMPTS, SFT_COMPLETIONS, 8)

  def test_overlong_completion_dropped(self, tok):
    out = data.encode_prompt_completion(tok, SFT_PROMPTS, SFT_COMPLETIONS, 8, drop_overlong=True)
    np.testing.assert_array_equal(out.kept, [0, 2])
    assert out.num_dropped == 1 and out.ids.shape == (2, 8)
    for row, i in enumerate(out.kept):
      ids, _, comp = _ref_right(tok, SFT_PROMPTS[i], SFT_COMPLETIONS[i], 8)
      np.testing.assert_array_equal(out.ids[row], ids)
      np.testing.assert_array_equal(out.completion_mask[row], comp)

  def test_completion_exactly_fills(self, tok):
    out = data.encode_prompt_completion(tok, ["note : the"], ["very nice ."], 4)
    np.testing.assert_array_equal(out.attention_mask[0], [1, 1, 1, 1])
    np.testing.assert_array_equal(out.completion_mask[0], [1, 1, 1, 1])
    assert out.num_truncated == 1

  def test_length_mismatch(self, tok):
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
      data.encode_prompt_completion(tok, ["a", "b"], ["c"], 8)


class TestEncodePreferences:

  def test_aligned_and_dropped_together(self, tok):
    pairs = [data.PreferencePair("note : the lamp looked", "nice .", "very ugly !"),
             data.PreferencePair("note : the bed looked", "good .",
                                 "dull , but the plot was bad ."),
             data.PreferencePair("", "nice .", "bad .")]
    out = data.encode_preferences(tok, pairs, 6, drop_overlong=True)
    np.testing.assert_array_equal(out.kept, [0, 2])
    assert out.num_dropped == 1
    for row, i in enumerate(out.kept):
      for side, ids, attn, comp in (
          ("chosen", out.chosen_ids, out.chosen_attention_mask, out.chosen_completion_mask),
          ("rejected", out.rejected_ids, out.rejected_attention_mask,
           out.rejected_completion_mask)):
        ref = _ref_right(tok, pairs[i].prompt, getattr(pairs[i], side), 6)
        np.testing.assert_array_equal(ids[row], ref[0])
        np.testing.assert_array_equal(attn[row], ref[1])
        np.testing.assert_array_equal(comp[row], ref[2])
    # Pair 0's 5-token prompt is cut on both sides; pair 2's empty prompt is not.
    assert out.num_truncated == 1

  def test_overlong_raises(self, tok):
    pairs = [data.PreferencePair("", "nice .", "dull , but the plot was bad .")]
    with pytest.raises(data.DataError, match="example 0: rejected completion has 9 tokens"):
      data.encode_preferences(tok, pairs, 6)


# Turns end in a marker of their own, not EOS: "<|end|>" stays in the assistant turn, EOS follows.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
HH_CHOSEN = "\n\nHuman: note : the lamp looked\n\nAssistant: very nice .\n\nHuman: and the film !"
HH_PAIR = data.split_hh_prefix(HH_CHOSEN + "\n\nAssistant: good .",
                               HH_CHOSEN + "\n\nAssistant: dull !")


@pytest.fixture
def chat_tok(tok):
  tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
  tok.chat_template = CHAT_TEMPLATE
  return tok


def _tokens(tok, ids, mask) -> list[str]:
  return tok.convert_ids_to_tokens(ids[mask == 1])


def _turn(role: str, text: str) -> list[str]:
  return [f"<|{role}|>", *text.split(), "<|end|>"]


class TestChatTemplate:

  def test_prompt_is_the_user_turn_and_the_generation_prompt(self, chat_tok):
    out = data.encode_prompts(chat_tok, PROMPTS, 20, use_chat_template=True)
    for i, p in enumerate(PROMPTS):
      assert _tokens(chat_tok, out.ids[i], out.mask[i]) == _turn("user", p) + ["<|assistant|>"]

  def test_completion_mask_covers_the_assistant_turn(self, chat_tok):
    out = data.encode_prompt_completion(chat_tok, SFT_PROMPTS[:2], SFT_COMPLETIONS[:2], 30,
                                        use_chat_template=True)
    for i, (p, c) in enumerate(zip(SFT_PROMPTS, SFT_COMPLETIONS[:2])):
      reply = [*c.split(), "<|end|>", "<eos>"]
      assert _tokens(chat_tok, out.ids[i], out.attention_mask[i]) == (
          _turn("user", p) + ["<|assistant|>"] + reply)
      assert _tokens(chat_tok, out.ids[i], out.completion_mask[i]) == reply

  def test_a_template_that_ends_turns_in_eos_gives_one_eos(self, chat_tok):
    chat_tok.chat_template = CHAT_TEMPLATE.replace("<|end|>", "{{ eos_token }}")
    out = data.encode_preferences(chat_tok, [data.PreferencePair(" note : the", " nice .", "bad")],
                                  12, use_chat_template=True)
    assert _tokens(chat_tok, out.chosen_ids[0], out.chosen_completion_mask[0]) == [
        "nice", ".", "<eos>"]
    assert _tokens(chat_tok, out.rejected_ids[0], out.rejected_attention_mask[0]) == [
        "<|user|>", "note", ":", "the", "<eos>", "<|assistant|>", "bad", "<eos>"]

  def test_prompt_tokens_are_the_same_in_every_encoding(self, chat_tok):
    """The policy samples at RL time from the prompt tokens it was fine-tuned and scored on."""
    prompts = SFT_PROMPTS[:2] + [HH_PAIR.prompt]
    ppo = data.encode_prompts(chat_tok, prompts, 24, use_chat_template=True)
    sft = data.encode_prompt_completion(chat_tok, prompts, ["nice ."] * 3, 40,
                                        use_chat_template=True)
    prefs = data.encode_preferences(chat_tok, [data.PreferencePair(p, "nice .", "bad .")
                                               for p in prompts], 40, use_chat_template=True)
    rows = [(sft.ids, sft.attention_mask, sft.completion_mask),
            (prefs.chosen_ids, prefs.chosen_attention_mask, prefs.chosen_completion_mask),
            (prefs.rejected_ids, prefs.rejected_attention_mask, prefs.rejected_completion_mask)]
    for i in range(len(prompts)):
      want = ppo.ids[i][ppo.mask[i] == 1]
      for ids, attn, comp in rows:
        np.testing.assert_array_equal(ids[i][(attn[i] - comp[i]) == 1], want)

  def test_hh_dialogue_becomes_its_turns(self, chat_tok):
    out = data.encode_preferences(chat_tok, [HH_PAIR], 40, use_chat_template=True)
    prompt = out.chosen_attention_mask[0] - out.chosen_completion_mask[0]
    assert _tokens(chat_tok, out.chosen_ids[0], prompt) == (
        _turn("user", "note : the lamp looked") + _turn("assistant", "very nice .")
        + _turn("user", "and the film !") + ["<|assistant|>"])
    assert _tokens(chat_tok, out.rejected_ids[0], out.rejected_completion_mask[0]) == [
        "dull", "!", "<|end|>", "<eos>"]

  def test_hh_reply_with_further_turns_is_refused(self, chat_tok):
    pair = data.PreferencePair(HH_PAIR.prompt, " good .\n\nHuman: and ?\n\nAssistant: nice", "bad")
    with pytest.raises(data.DataError, match="example 0: the reply continues the HH dialogue"):
      data.encode_preferences(chat_tok, [pair], 40, use_chat_template=True)

  @pytest.mark.parametrize("encode", [
      lambda tok: data.encode_prompt_completion(tok, SFT_PROMPTS, SFT_COMPLETIONS, 30,
                                                use_chat_template=True),
      lambda tok: data.encode_preferences(tok, [HH_PAIR, data.PreferencePair("", "a", "b")], 30,
                                          use_chat_template=True)], ids=["sft", "pairs"])
  def test_reply_without_a_prompt_is_refused(self, chat_tok, encode):
    with pytest.raises(data.DataError, match=r"example \d: empty prompt: with use_chat_template"):
      encode(chat_tok)

  def test_template_whose_conversation_does_not_start_with_its_prompt_is_refused(self, chat_tok):
    chat_tok.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}",
                                                   "<|assistant|> :{% endif %}")
    with pytest.raises(data.DataError, match="does not start with the prompt as rendered for "
                                             "generation"):
      data.encode_prompt_completion(chat_tok, ["note"], ["nice"], 20, use_chat_template=True)

  @pytest.mark.parametrize("encode", [
      lambda tok: data.encode_prompt_completion(tok, ["note"], ["nice"], 8, use_chat_template=True),
      lambda tok: data.encode_preferences(tok, [HH_PAIR], 8, use_chat_template=True)],
                           ids=["sft", "pairs"])
  def test_missing_template_is_refused(self, tok, encode):
    with pytest.raises(ValueError, match="has no chat_template"):
      encode(tok)

  def test_without_the_flag_a_template_is_not_used(self, chat_tok):
    out = data.encode_prompt_completion(chat_tok, SFT_PROMPTS, SFT_COMPLETIONS, 20)
    for i, (p, c) in enumerate(zip(SFT_PROMPTS, SFT_COMPLETIONS)):
      np.testing.assert_array_equal(out.ids[i], _ref_right(chat_tok, p, c, 20)[0])


def test_without_torch_the_tokenizer_loads_with_no_advice_and_the_switch_is_restored(
    tok_dir):
  """As installed by the README's main command (no torch, tests/torchless): transformers'
  "PyTorch was not found" advice is not logged, and the environment is left as it was."""
  code = ("import os; from rlhf_jax import data; "
          f"print(data.load_tokenizer({tok_dir!r})('good').input_ids, "
          "os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))")
  env = tiny_ppo.env("")
  env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=tiny_ppo.ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "PyTorch" not in proc.stderr, proc.stderr
  assert proc.stdout.split()[-1] == "None"
