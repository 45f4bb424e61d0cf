"""Tests for rlhf_jax.data.tokenize against per-row Python reference encodings."""

import numpy as np
import pytest
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
