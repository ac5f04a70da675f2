"""Tests of train/data.py: tasks, splits, tokenization masks, padding/packing, batches, label rows.

Fast (no JAX): a tiny byte-level BPE tokenizer with a small chat template stands in for a real one;
one test uses the real SmolLM2 tokenizer when ``dora_jax.models.smollm2`` can provide it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train import data as D

SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
DEFAULT_SYSTEM = "You are a tiny test bot."
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|system|>" + DEFAULT_SYSTEM + "</s>\n{% endif %}"
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["Review: a great film\nSentiment: positive", "Review: a dull boring film\nSentiment: negative",
          "positive negative positive negative", "The quick brown fox jumps over the lazy dog.",
          "Hello world, this is a tiny tokenizer for tests."] * 3


@pytest.fixture(scope="module")
def tok():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(CORPUS, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def plain_tok(tok):
  """The same tokenizer without a chat template."""
  import copy
  t = copy.deepcopy(tok)
  t.chat_template = None
  return t


def _examples(n=12, labels=("positive", "negative")):
  return [D.Example(f"Review: film number {i} was {'great' if i % 3 else 'dull'}", labels[i % len(labels)],
                    i % len(labels)) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Tokenization and masks
# ----------------------------------------------------------------------------------------------


def test_chat_template_mask_covers_response_and_end_of_turn(tok):
  ids, mask = D.encode_example(tok, "Review: a great film", "positive", chat_template=True, max_len=128)
  assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
  assert tok.decode(ids[mask > 0]) == "positive</s>"
  n_prompt = int((mask == 0).sum())
  assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()  # prompt first, then response
  prompt_text = tok.apply_chat_template([{"role": "user", "content": "Review: a great film"}],
                                        add_generation_prompt=True, tokenize=False)
  assert tok.decode(ids[:n_prompt]) == prompt_text
  assert DEFAULT_SYSTEM in prompt_text  # the template's default system prompt is kept with None


def test_system_prompt_override(tok):
  default, _ = D.encode_example(tok, "hi", "positive", chat_template=True, max_len=128)
  empty, m = D.encode_example(tok, "hi", "positive", chat_template=True, max_len=128, system_prompt="")
  short, _ = D.encode_example(tok, "hi", "positive", chat_template=True, max_len=128, system_prompt="Be brief.")
  assert DEFAULT_SYSTEM not in tok.decode(empty) and len(empty) < len(default)
  assert "Be brief." in tok.decode(short) and DEFAULT_SYSTEM not in tok.decode(short)
  assert tok.decode(empty[m > 0]) == "positive</s>"


def test_plain_format_mask(tok, plain_tok):
  for t, ct in ((tok, False), (plain_tok, True)):  # no template -> plain format even if asked
    ids, mask = D.encode_example(t, "Review: a dull film", "negative", chat_template=ct, max_len=64)
    assert t.decode(ids) == "Review: a dull film negative</s>"
    assert t.decode(ids[mask > 0]) == " negative</s>"


def test_truncation_keeps_template_and_end_of_prompt(tok):
  long_prompt = " ".join(f"w{i}" for i in range(200)) + " END"
  full, _ = D.encode_example(tok, long_prompt, "positive", chat_template=True, max_len=4096)
  ids, mask = D.encode_example(tok, long_prompt, "positive", chat_template=True, max_len=40)
  assert len(full) > 40 and len(ids) == 40
  text = tok.decode(ids)
  assert text.startswith("<|system|>" + DEFAULT_SYSTEM + "</s>\n<|user|>")  # header kept
  assert text.endswith("END</s>\n<|assistant|>positive</s>")  # end of the content + footer kept
  assert tok.decode(ids[mask > 0]) == "positive</s>"
  with pytest.raises(ValueError, match="response needs"):
    D.encode_example(tok, "hi", "positive " * 30, chat_template=True, max_len=16)


def _with_template(tok, template):
  import copy
  t = copy.deepcopy(tok)
  t.chat_template = template
  return t


def test_chat_template_boundary_merge_falls_back_to_concatenation(tok):
  # the generation prompt ends in a space: "Answer: positive" tokenizes " positive" as one token, so the
  # prompt's tokens are not a prefix of the conversation's; the rule is prompt tokens + rest tokens
  t = _with_template(tok, "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
                          "{% else %}Answer: {{ m['content'] }}</s>{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}Answer: {% endif %}")
  msgs = [{"role": "user", "content": "a great film"}]
  p_text = t.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  f_text = t.apply_chat_template(msgs + [{"role": "assistant", "content": "positive"}], tokenize=False)
  p_ids, f_ids = t(p_text, add_special_tokens=False).input_ids, t(f_text, add_special_tokens=False).input_ids
  assert f_ids[:len(p_ids)] != p_ids  # the case under test
  ids, mask = D.encode_example(t, "a great film", "positive", chat_template=True, max_len=64)
  assert list(ids) == p_ids + t("positive</s>", add_special_tokens=False).input_ids
  assert t.decode(ids) == f_text and t.decode(ids[mask > 0]) == "positive</s>"
  # label scoring uses the same rule
  rows = D.label_choice_batch(t, ["a great film"], ("positive", "negative"), chat_template=True, seq_len=64)
  assert np.array_equal(rows["input_ids"][0, :len(ids) - 1], ids[:-1])


def test_chat_template_that_rewrites_the_prompt_is_rejected(tok):
  t = _with_template(tok, "{% if messages | length > 1 %}TRAIN {% endif %}"
                          "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  with pytest.raises(ValueError, match="renders the prompt differently"):
    D.encode_example(t, "hi", "positive", chat_template=True, max_len=64)


def test_loss_on_all(tok):
  resp, _ = D.encode_example(tok, "Review: a great film", "positive", chat_template=True, max_len=128)
  ids, mask = D.encode_example(tok, "Review: a great film", "positive", chat_template=True, max_len=128,
                               loss_on="all")
  assert np.array_equal(ids, resp) and mask[0] == 0 and mask[1:].all()
  arrays = D.build_dataset(_examples(4), tok, 64, loss_on="all")
  assert np.array_equal(arrays["loss_mask"].sum(1), arrays["attention_mask"].sum(1) - 1)
  with pytest.raises(ValueError, match="loss_on"):
    D.encode_example(tok, "a", "b", chat_template=True, max_len=64, loss_on="prompt")


def test_text_chunks_predict_every_token_once(tok):
  text = " ".join(CORPUS)
  whole = tok(text).input_ids + [tok.eos_token_id]
  pieces = D.encode_text(tok, text, max_len=16)
  assert all(len(ids) <= 16 for ids, _ in pieces) and len(pieces) > 3
  # consecutive pieces overlap by one token; masks count each token but the first exactly once
  rebuilt = list(pieces[0][0]) + [t for ids, _ in pieces[1:] for t in ids[1:]]
  assert rebuilt == whole
  assert sum(m.sum() for _, m in pieces) == len(whole) - 1
  arrays = D.build_dataset([D.TextExample(text)] * 2, tok, 16, packing=False)
  assert arrays["loss_mask"].sum() == 2 * (len(whole) - 1)


# ----------------------------------------------------------------------------------------------
# Padding and packing
# ----------------------------------------------------------------------------------------------


def _check_rows(arrays, seq_len):
  assert set(arrays) == set(D.ARRAY_KEYS)
  dtypes = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32, "attention_mask": np.int32,
            "positions": np.int32, "segment_ids": np.int32}
  for k, v in arrays.items():
    assert v.dtype == dtypes[k] and v.ndim == 2 and v.shape[1] == seq_len, k
  seg, am = arrays["segment_ids"], arrays["attention_mask"]
  assert np.array_equal(am, (seg > 0).astype(np.int32))
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  # targets are the next input inside a segment; no loss across segments or on padding
  assert np.array_equal(np.where(same, arrays["targets"][:, :-1], 0), np.where(same, arrays["input_ids"][:, 1:], 0))
  assert not arrays["loss_mask"][:, :-1][~same].any() and not arrays["loss_mask"][:, -1].any()


def _segments(arrays):
  out = []
  for r in range(len(arrays["input_ids"])):
    seg = arrays["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
      assert np.array_equal(arrays["positions"][r, where], np.arange(len(where)))  # restart at 0
      out.append((tuple(arrays["input_ids"][r, where]), float(arrays["loss_mask"][r, where].sum())))
  return out


def test_pad_batch(tok):
  enc = D.encode_examples(tok, _examples(6), chat_template=True, max_len=48)
  arrays = D.pad_batch(enc, 48, pad_id=0)
  _check_rows(arrays, 48)
  assert len(arrays["input_ids"]) == 6
  for r, (ids, mask) in enumerate(enc):
    n = len(ids)
    assert np.array_equal(arrays["input_ids"][r, :n], ids) and not arrays["input_ids"][r, n:].any()
    assert np.array_equal(arrays["segment_ids"][r], (np.arange(48) < n).astype(np.int32))
    assert np.array_equal(arrays["loss_mask"][r, :n - 1], mask[1:])
    # the targets where the loss counts decode to the response + end-of-turn
    assert tok.decode(arrays["targets"][r][arrays["loss_mask"][r] > 0]) == _examples(6)[r].response + "</s>"
  with pytest.raises(ValueError):
    D.pad_batch(enc, 10)


def test_pack_rows_invariants(tok):
  rng = np.random.default_rng(0)
  enc = [(rng.integers(3, 250, size=n).astype(np.int32), (rng.random(n) < 0.5).astype(np.float32))
         for n in rng.integers(1, 33, size=80)]
  arrays = D.pack_rows(enc, 32, pad_id=0)
  _check_rows(arrays, 32)
  assert len(arrays["input_ids"]) < len(enc)  # several per row
  got = sorted(_segments(arrays))
  want = sorted((tuple(ids), float(m[1:].sum())) for ids, m in enc)
  assert got == want  # every example exactly once, whole; the loss keeps each example's targets
  assert arrays["attention_mask"].sum() == sum(len(ids) for ids, _ in enc)


def test_build_dataset_packed_and_padded_agree(tok):
  ex = _examples(10)
  padded = D.build_dataset(ex, tok, 128, packing=False, chat_template=True)
  packed = D.build_dataset(ex, tok, 128, packing=True, chat_template=True)
  _check_rows(padded, 128)
  _check_rows(packed, 128)
  assert sorted(_segments(padded)) == sorted(_segments(packed))
  assert len(packed["input_ids"]) < len(padded["input_ids"]) == 10
  task = D.Task("t", "label", tuple(ex), ("positive", "negative"), "")
  assert all(np.array_equal(D.build_dataset(task, ex, tok, 128)[k], padded[k]) for k in D.ARRAY_KEYS)


# ----------------------------------------------------------------------------------------------
# Splits and batches
# ----------------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_stratified():
  ex = [D.Example(f"p{i}", "abc"[y], y) for i, y in enumerate([0] * 70 + [1] * 20 + [2] * 10)]
  tr, ev = D.split_examples(ex, 20, seed=3)
  assert (tr, ev) == D.split_examples(ex, 20, seed=3)
  assert ev != D.split_examples(ex, 20, seed=4)[1]
  assert len(ev) == 20 and len(tr) == 80
  assert {e.prompt for e in tr} | {e.prompt for e in ev} == {e.prompt for e in ex}
  assert not {e.prompt for e in tr} & {e.prompt for e in ev}
  assert np.array_equal(np.bincount([e.label_id for e in ev]), [14, 4, 2])
  texts = [D.TextExample(f"t{i}") for i in range(30)]
  tr, ev = D.split_examples(texts, 7, seed=0)
  assert len(ev) == 7 and not set(tr) & set(ev) and len(set(tr) | set(ev)) == 30
  with pytest.raises(ValueError):
    D.split_examples(texts, 30, seed=0)


def test_split_keeps_duplicates_out_of_train():
  ex = [D.Example(f"p{i % 12}", "ab"[i % 12 % 2], i % 12 % 2) for i in range(30)]  # 12 distinct, repeated
  for seed in range(5):
    tr, ev = D.split_examples(ex, 4, seed=seed)
    assert len(ev) == len(set(ev)) == 4 and not set(tr) & set(ev)
    assert set(tr) | set(ev) == set(ex) and len(tr) == 30 - sum(ex.count(e) for e in ev)
    assert np.array_equal(np.bincount([e.label_id for e in ev]), [2, 2])
  with pytest.raises(ValueError, match="12 distinct"):
    D.split_examples(ex, 12, seed=0)


def test_split_fraction_and_majority_from_examples():
  ex = [D.Example(f"p{i}", "ab"[y], y) for i, y in enumerate([0] * 30 + [1] * 10)]
  tr, ev = D.split_examples(ex, 0.25, seed=0)
  assert len(ev) == 10 and len(tr) == 30
  assert np.array_equal(np.bincount([e.label_id for e in ev]), [8, 2])  # quotas 7.5 / 2.5: tie -> label 0
  assert (tr, ev) == D.split_examples(ex, 10, seed=0)  # a fraction is the same as its count
  assert D.eval_count(0.1, 25) == 3 and D.eval_count(0.5, 3) == 2 and D.eval_count(0, 5) == 0
  for bad in (1.0, 0.0, -1, 40, True, "10"):
    with pytest.raises((ValueError, TypeError)):
      D.split_examples(ex, bad, seed=0)
  assert D.majority_class_rate(ex) == 0.75 == D.majority_class_rate(np.array([e.label_id for e in ex]))
  with pytest.raises(ValueError, match="label examples"):
    D.majority_class_rate([D.Example("a", "b")])


def _arrays(n=23, t=4):
  ids = np.arange(n * t, dtype=np.int32).reshape(n, t)
  return {"input_ids": ids, "targets": ids + 1}


def test_iterator_epochs_and_resume():
  arrays = _arrays()
  it = D.BatchIterator(arrays, 5, seed=7)
  stream = [next(it)["input_ids"][:, 0] // 4 for _ in range(10)]  # 50 rows: 2 epochs + 4
  flat = np.concatenate(stream)
  assert sorted(flat[:23]) == list(range(23)) and sorted(flat[23:46]) == list(range(23))
  assert not np.array_equal(flat[:23], flat[23:46])  # reshuffled per epoch
  assert it.state() == {"epoch": 2, "position": 4}

  it = D.BatchIterator(arrays, 5, seed=7)
  for _ in range(6):
    next(it)
  state = json.loads(json.dumps(it.state()))
  rest = [next(it) for _ in range(4)]
  resumed = D.BatchIterator(arrays, 5, seed=7)
  resumed.restore(state)
  for a, b in zip(rest, (next(resumed) for _ in range(4))):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert np.array_equal(np.concatenate([r["input_ids"][:, 0] // 4 for r in rest]), flat[30:50])
  ordered = D.BatchIterator(arrays, 23, seed=0, shuffle=False)
  assert np.array_equal(next(ordered)["input_ids"][:, 0] // 4, np.arange(23))
  small = D.BatchIterator(_arrays(3), 8, seed=0)  # fewer rows than a batch: still full batches
  assert next(small)["input_ids"].shape == (8, 4)


@pytest.mark.parametrize("procs", [2, 4])
def test_process_shards_union_is_global_batch(procs):
  arrays = _arrays()
  glob = D.BatchIterator(arrays, 8, seed=1)
  shards = [D.BatchIterator(arrays, 8, seed=1, process_index=p, process_count=procs) for p in range(procs)]
  for _ in range(7):
    g = next(glob)
    local = [next(s) for s in shards]
    assert all(l["input_ids"].shape == (8 // procs, 4) for l in local)
    assert np.array_equal(np.concatenate([l["input_ids"] for l in local]), g["input_ids"])
  with pytest.raises(ValueError):
    D.BatchIterator(arrays, 6, seed=1, process_index=0, process_count=4)


def test_iterator_drop_last():
  arrays = _arrays(23)
  it = D.BatchIterator(arrays, 5, seed=3, drop_last=True)
  assert it.batches_per_epoch == 4
  epochs = [np.concatenate([next(it)["input_ids"][:, 0] // 4 for _ in range(4)]) for _ in range(3)]
  for e, rows in enumerate(epochs):
    perm = np.random.default_rng([3, e]).permutation(23)
    assert np.array_equal(rows, perm[:20])  # the last 23 % 5 rows of each epoch's order are skipped
  assert it.state() == {"epoch": 3, "position": 0}
  state = {"epoch": 1, "position": 10}
  a, b = D.BatchIterator(arrays, 5, seed=3, drop_last=True), D.BatchIterator(arrays, 5, seed=3, drop_last=True)
  for _ in range(6):
    next(a)
  b.restore(state)
  assert a.state() == state and all(np.array_equal(next(a)["input_ids"], next(b)["input_ids"]) for _ in range(5))
  with pytest.raises(ValueError, match="multiple of"):
    b.restore({"epoch": 0, "position": 7})
  with pytest.raises(ValueError, match="drop_last=False"):
    D.BatchIterator(_arrays(3), 8, drop_last=True)


def test_shard_method_continues_from_the_global_state():
  arrays = _arrays()
  glob = D.BatchIterator(arrays, 6, seed=5)
  for _ in range(3):
    next(glob)
  shards = [glob.shard(p, 3) for p in range(3)]
  assert all(s.state() == glob.state() and s.local_batch_size == 2 for s in shards)
  for _ in range(5):
    g = next(glob)["input_ids"]
    assert np.array_equal(np.concatenate([next(s)["input_ids"] for s in shards]), g)
  with pytest.raises(ValueError):
    glob.shard(3, 3)


# ----------------------------------------------------------------------------------------------
# Label evaluation rows
# ----------------------------------------------------------------------------------------------


def test_label_choice_rows(tok):
  prompts = ["Review: a great film", "Review: a dull boring film", "Review: ok"]
  labels = ("positive", "negative", "so so")
  for ct in (True, False):
    arrays = D.label_choice_batch(tok, prompts, labels, chat_template=ct, seq_len=64)
    _check_rows(arrays, 64)
    assert len(arrays["input_ids"]) == len(prompts) * len(labels)
    for n in range(len(prompts)):
      for k, label in enumerate(labels):
        r = n * len(labels) + k
        scored = tok.decode(arrays["targets"][r][arrays["loss_mask"][r] > 0])
        assert scored == (label if ct else " " + label)  # the label only, no end-of-turn
        assert prompts[n] in tok.decode(arrays["input_ids"][r])
  task = D.Task("t", "label", tuple(_examples(4)), ("positive", "negative"), "")
  rows = D.label_choice_rows(task, task.examples, tok, 40, chat_template=True)
  assert rows["input_ids"].shape == (8, 40)


def test_label_scoring_batches(tok):
  ex = _examples(5)
  labels = ("positive", "negative", "so so")
  batches = list(D.label_scoring_batches(ex, tok, labels, seq_len=48, batch_size=4, chat_template=True))
  assert len(batches) == 4  # 15 rows in batches of 4, the last padded with one empty row
  assert all(b["input_ids"].shape == (4, 48) and b["example_index"].shape == (4,) for b in batches)
  flat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  _check_rows({k: flat[k] for k in D.ARRAY_KEYS}, 48)
  assert list(flat["example_index"]) == [n for n in range(5) for _ in labels] + [-1]
  assert list(flat["label_index"]) == list(range(3)) * 5 + [-1]
  assert not flat["loss_mask"][-1].any() and not flat["attention_mask"][-1].any()
  whole = D.label_choice_batch(tok, [e.prompt for e in ex], labels, chat_template=True, seq_len=48)
  assert all(np.array_equal(flat[k][:15], whole[k]) for k in D.ARRAY_KEYS)
  # a row's score: the number of label tokens stands in for a log-likelihood here
  row_scores = flat["loss_mask"].sum(1) * np.where(flat["label_index"] == 2, 10, 1)
  scores = D.label_score_matrix(flat["example_index"], flat["label_index"], row_scores, 5, 3)
  assert scores.shape == (5, 3) and (scores.argmax(1) == 2).all()
  with pytest.raises(ValueError, match="scored once"):
    D.label_score_matrix(flat["example_index"][:-2], flat["label_index"][:-2], row_scores[:-2], 5, 3)


def test_label_token_fast_path(tok):
  labels = ("positive", "negative")
  # chat format: "negative" at the start of the assistant turn is two tokens with this tokenizer
  assert D.label_token_ids(tok, labels, chat_template=True) is None
  with pytest.raises(ValueError, match="use label_choice_batch"):
    D.label_token_ids(tok, labels, chat_template=True, strict=True)
  ids = D.label_token_ids(tok, labels, chat_template=False)
  assert [tok.decode([i]) for i in ids] == [" positive", " negative"]
  prompts = ["Review: a great film", "Review: " + "very " * 60 + "dull"]
  arrays, last = D.label_prompt_batch(tok, prompts, chat_template=False, seq_len=24)
  assert np.array_equal(last, arrays["attention_mask"].sum(1) - 1) and not arrays["loss_mask"].any()
  for n, p in enumerate(prompts):
    full, mask = D.encode_example(tok, p, "negative", chat_template=False, max_len=24)
    # the prompt row ends like the training row before the label (the label token follows
    # last_index); a truncated prompt may start one token later (room for one label token vs label+eos)
    k = int((mask == 0).sum())
    row = arrays["input_ids"][n, :last[n] + 1]
    assert np.array_equal(row[-(k - 1):], full[:k][-(k - 1):]) and full[k] == ids[1]
    assert (len(row) == k) == (n == 0)
  task = D.Task("t", "label", tuple(_examples(2)), labels, "")
  assert np.array_equal(D.prompt_rows(task, task.examples, tok, 24, chat_template=False)["input_ids"],
                        D.label_prompt_batch(tok, [e.prompt for e in task.examples], chat_template=False,
                                             seq_len=24)[0]["input_ids"])


def test_majority_class_rate():
  assert D.majority_class_rate([0, 1, 1, 2]) == 0.5
  with pytest.raises(ValueError):
    D.majority_class_rate([])


# ----------------------------------------------------------------------------------------------
# Bundled tasks
# ----------------------------------------------------------------------------------------------


def test_registry_describes_the_loaded_tasks():
  assert D.BUNDLED_TASKS == ("rotten_tomatoes", "bbc_news", "hamlet", "fortunes")
  hamlet = D.load_task("hamlet", max_words=32)
  assert D.TASKS["hamlet"].kind == hamlet.kind == "text"
  assert max(len(e.text.split()) for e in hamlet.examples if "\n" in e.text) <= 32
  with pytest.raises(ValueError, match="no template"):
    D.load_task("hamlet", template="{text}")
  with pytest.raises(ValueError, match="no max_words"):
    D.load_task("rotten_tomatoes", max_words=10)
  with pytest.raises(FileNotFoundError, match="not a bundled task"):
    D.load_task("imdb")


def test_rotten_tomatoes():
  task = D.load_task("rotten_tomatoes")
  spec = D.TASKS["rotten_tomatoes"]
  assert task.kind == spec.kind == "label" and task.labels == spec.labels == ("positive", "negative")
  assert len(task.examples) == 12_808
  assert np.array_equal(np.bincount(task.label_ids), [7403, 5405])
  assert D.majority_class_rate(task.label_ids) == pytest.approx(0.578, abs=5e-4)
  ex = task.examples[0]
  assert ex.prompt.startswith("Review: ") and ex.prompt.endswith("\nSentiment (positive or negative):")
  assert ex.response == task.labels[ex.label_id]


def test_bbc_news():
  task = D.load_task("bbc_news")
  assert task.kind == "label" and len(task.examples) == 2_225 and task.labels == D.TASKS["bbc_news"].labels
  assert task.labels == ("business", "entertainment", "politics", "sports", "tech")
  assert np.array_equal(np.bincount(task.label_ids), [510, 386, 417, 511, 401])
  texts = [e.prompt[len("Article: "):e.prompt.index("\nTopic (")] for e in task.examples]
  assert max(len(t.split()) for t in texts) <= D.BBC_MAX_WORDS == 45
  assert max(len(t.split()) for t in
             (e.prompt for e in D.load_bbc_news(max_words=20).examples[:50])) <= 20 + 8
  distinct = set(task.examples)
  assert len(distinct) == 2_107  # 100 articles repeat whole, 18 more in their first 45 words
  train, held = D.split_examples(task.examples, 400, seed=0)
  assert len(held) == len(set(held)) == 400 and not set(train) & set(held)
  d_counts = np.bincount([e.label_id for e in distinct])
  assert np.abs(np.bincount([e.label_id for e in held]) - 400 * d_counts / len(distinct)).max() <= 1
  assert len(train) == 2_225 - 400 - sum(task.examples.count(e) - 1 for e in held)


def test_hamlet_and_fortunes(tmp_path):
  hamlet = D.load_task("hamlet")
  assert hamlet.kind == "text" and len(hamlet.examples) > 300
  assert all(len(e.text.split()) <= 64 or "\n" not in e.text for e in hamlet.examples)
  with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
    D.load_fortunes(tmp_path / "missing")
  (tmp_path / "f").write_text("one\nline\n%\ntwo\n%\n")
  (tmp_path / "f.dat").write_bytes(b"\x00\x01")
  assert [e.text for e in D.load_fortunes(tmp_path).examples] == ["one\nline", "two"]
  if D.FORTUNES_DIR.is_dir():
    assert len(D.load_task("fortunes").examples) > 10_000


# ----------------------------------------------------------------------------------------------
# User files
# ----------------------------------------------------------------------------------------------


def _write(path: Path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def test_user_files_load(tmp_path):
  gen = D.load_task(_write(tmp_path / "g.jsonl", [json.dumps({"q": "2+2?", "a": "4"}), "",
                                                   json.dumps({"q": "3+3?", "a": "6"})]),
                    prompt_field="q", response_field="a")
  assert gen.kind == "generation" and gen.examples == (D.Example("2+2?", "4"), D.Example("3+3?", "6"))
  lab = D.load_task(_write(tmp_path / "l.csv", ["text,label", "good movie,pos", '"bad, ""awful""",neg']))
  assert lab.kind == "label" and lab.labels == ("neg", "pos")
  assert [e.label_id for e in lab.examples] == [1, 0] and lab.examples[0].response == "pos"
  assert 'bad, "awful"' in lab.examples[1].prompt
  txt = D.load_task(_write(tmp_path / "t.txt", ["para one", "still one", "", "", "para two"]))
  assert txt.kind == "text" and [e.text for e in txt.examples] == ["para one\nstill one", "para two"]
  txt_jsonl = D.load_task(_write(tmp_path / "t.jsonl", [json.dumps({"body": "x y"})]), text_field="body")
  assert txt_jsonl.kind == "text"
  with pytest.raises(FileNotFoundError):
    D.load_task(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("lines, kw, message", [
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": "y"}', '{"text": "c", "label": '],
     {}, r"bad\.jsonl: row 3 \(line 3\): invalid JSON"),
    (['{"text": "a", "label": "x"}', '{"text": "b"}'], {}, r"row 2 \(line 2\): missing field 'label'"),
    (['{"text": "a", "label": "x"}', '{"text": "  ", "label": "x"}'], {}, r"row 2 .*field 'text' is empty"),
    (['{"text": "a", "label": "x"}', '', '{"text": "b", "label": "z"}'], {"labels": ("x", "y")},
     r"row 2 \(line 3\): unknown label 'z'"),
    (['{"prompt": "a", "response": "b"}', '[1, 2]'], {}, r"row 2 .*expected a JSON object"),
    (['{"prompt": "a", "response": 5}'], {}, r"row 1 .*'response' must be a string"),
    (['{"foo": 1}'], {}, r"row 1 has fields \['foo'\]"),
])
def test_jsonl_errors_name_file_and_row(tmp_path, lines, kw, message):
  with pytest.raises(ValueError, match=message):
    D.load_task(_write(tmp_path / "bad.jsonl", lines), **kw)


def test_json_array_file(tmp_path):
  good = tmp_path / "a.json"
  good.write_text(json.dumps([{"text": "fine", "label": 1}, {"text": "bad", "label": 0}]))
  task = D.load_task(good)
  assert task.kind == "label" and task.labels == ("0", "1") and [e.label_id for e in task.examples] == [1, 0]
  bad = tmp_path / "b.json"
  bad.write_text(json.dumps([{"text": "fine", "label": 1}, {"text": "", "label": 0}]))
  with pytest.raises(ValueError, match=r"b\.json: row 2: field 'text' is empty"):
    D.load_task(bad)
  bad.write_text('[{"text": "fine", "label": 1},\n {"text": ')
  with pytest.raises(ValueError, match=r"b\.json: invalid JSON at line 2"):
    D.load_task(bad)


@pytest.mark.parametrize("lines, kw, message", [
    (["text,label", "a,x", "b,y,extra"], {}, r"bad\.csv: row 2 \(line 3\): 3 fields, but the header has 2"),
    (["text,label", '"multi', 'line",x', ",y"], {}, r"row 2 \(line 4\): field 'text' is empty"),
    (["text,label", "a,x", "b,"], {}, r"row 2 \(line 3\): field 'label' is empty"),
    (["text,label", "a,x", "b,q"], {"labels": ("x", "y")}, r"row 2 \(line 3\): unknown label 'q'"),
    (["prompt,response", "a,b", "c,"], {}, r"row 2 .*'response' is empty"),
])
def test_csv_errors_name_file_and_row(tmp_path, lines, kw, message):
  with pytest.raises(ValueError, match=message):
    D.load_task(_write(tmp_path / "bad.csv", lines), **kw)


# ----------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer (skipped when dora_jax.models.smollm2 cannot provide it)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tok():
  """The converted tokenizer from dora_jax's cache (no JAX import), else converted from the GGUF."""
  import os
  cache = Path(os.environ.get("DORA_JAX_CACHE") or Path.home() / ".cache" / "dora_jax") / "smollm2-135m-instruct"
  if (cache / "tokenizer.json").exists():
    from transformers import PreTrainedTokenizerFast  # AutoTokenizer would import torch
    return PreTrainedTokenizerFast.from_pretrained(str(cache), local_files_only=True)
  try:
    import gguf

    from dora_jax.models import smollm2
    return smollm2.gguf_tokenizer(gguf.GGUFReader(smollm2.find_smollm2_gguf()))
  except (ImportError, AttributeError, FileNotFoundError) as e:
    pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


def test_smollm2_tokenizer(smol_tok):
  tok = smol_tok
  ex = D.LabelTask(("positive", "negative"), D.RT_TEMPLATE).example("A three-hour cinema master class.", 0)
  ids, mask = D.encode_example(tok, ex.prompt, ex.response, chat_template=True, max_len=128)
  assert tok.decode(ids[mask > 0]) == "positive<|im_end|>"
  assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)
  short, m2 = D.encode_example(tok, ex.prompt, ex.response, chat_template=True, max_len=128, system_prompt="")
  assert len(ids) - len(short) == 16  # the default system prompt costs 16 tokens
  assert tok.decode(short[m2 > 0]) == "positive<|im_end|>"
  plain, m3 = D.encode_example(tok, ex.prompt, ex.response, chat_template=False, max_len=128)
  assert tok.decode(plain[m3 > 0]) == " positive<|im_end|>"
  for ct in (True, False):
    lab = D.label_token_ids(tok, ("positive", "negative"), chat_template=ct)
    assert lab is not None and len(set(lab.tolist())) == 2
  arrays = D.label_choice_batch(tok, [ex.prompt], ("business", "entertainment"), chat_template=True, seq_len=96)
  assert [tok.decode(arrays["targets"][r][arrays["loss_mask"][r] > 0]) for r in range(2)] == [
      "business", "entertainment"]
