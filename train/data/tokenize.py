"""Tokenization: chat template, prompt/response boundaries, response-only loss masks, texts.

Part of :mod:`train.data`; see its docstring for the pipeline and the array layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from train.data.records import AnyExample, Encoded, Example, TextExample


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
  """Whether the tokenizer carries a chat template."""
  return bool(getattr(tokenizer, "chat_template", None))


def pad_token_id(tokenizer) -> int:
  """The id used on padding: pad, else eos, else 0."""
  for attr in ("pad_token_id", "eos_token_id"):
    v = getattr(tokenizer, attr, None)
    if isinstance(v, (list, tuple)):
      v = v[0] if v else None
    if v is not None:
      return int(v)
  return 0


def _eos_id(tokenizer) -> int | None:
  v = getattr(tokenizer, "eos_token_id", None)
  if isinstance(v, (list, tuple)):
    v = v[0] if v else None
  return None if v is None else int(v)


def _tokenize(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
  if not texts:
    return []
  out = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_attention_mask=False)
  return [list(map(int, ids)) for ids in out["input_ids"]]


def _special_ids(tokenizer) -> set[int]:
  """Ids that can end a turn: the named special tokens, added tokens marked special, and EOS."""
  special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
  added = getattr(tokenizer, "added_tokens_decoder", None) or {}
  special.update(int(i) for i, t in added.items() if getattr(t, "special", False))
  eos = _eos_id(tokenizer)
  if eos is not None:
    special.add(eos)
  return special


def _messages(prompt: str, response: str | None, system_prompt: str | None) -> list[dict]:
  msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
  msgs.append({"role": "user", "content": prompt})
  if response is not None:
    msgs.append({"role": "assistant", "content": response})
  return msgs


def _render_chat(tokenizer, convs: list[list[dict]], add_generation_prompt: bool) -> list[str]:
  if not convs:
    return []
  out = tokenizer.apply_chat_template(convs, add_generation_prompt=add_generation_prompt, tokenize=False)
  return [out] if isinstance(out, str) else list(out)


def _check_system_prompt(tokenizer, system_prompt: str | None) -> None:
  if system_prompt is None:
    return
  try:
    text = _render_chat(tokenizer, [_messages("x", None, system_prompt)], True)[0]
  except Exception as e:  # templates that reject a system role raise from Jinja
    raise ValueError(f"The tokenizer's chat template does not accept a system message: {e}") from e
  if system_prompt and system_prompt not in text:
    raise ValueError("The tokenizer's chat template drops the system message; use system_prompt=None.")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


@dataclasses.dataclass(frozen=True)
class _Parts:
  prompt: list[int]   # prompt tokens (template header, content, generation prompt)
  response: list[int]  # response tokens
  end: list[int]      # end-of-turn / eos token(s) after the response (trained on)
  header: int         # template tokens before the prompt's content (kept when truncating)
  footer: int         # template tokens after the prompt's content (kept when truncating)


def _encode_parts(tokenizer, prompts: Sequence[str], responses: Sequence[str], *, chat_template: bool,
                  system_prompt: str | None) -> list[_Parts]:
  """Tokenizes prompt/response pairs the way they are trained and scored (see encode_example)."""
  chat_template = chat_template and has_chat_template(tokenizer)  # no template: plain formatting
  if chat_template:
    _check_system_prompt(tokenizer, system_prompt)
    p_text = _render_chat(tokenizer, [_messages(p, None, system_prompt) for p in prompts], True)
    f_text = _render_chat(tokenizer, [_messages(p, r, system_prompt) for p, r in zip(prompts, responses)], False)
    empty_text = _render_chat(tokenizer, [_messages("", None, system_prompt)], True)
    p_ids = _tokenize(tokenizer, p_text, False)
    f_ids = _tokenize(tokenizer, f_text, False)
    empty = _tokenize(tokenizer, empty_text, False)[0]
    special = _special_ids(tokenizer)
  else:
    if system_prompt:
      prompts = [system_prompt + "\n" + p for p in prompts]
    p_ids = _tokenize(tokenizer, prompts, True)
    f_ids = _tokenize(tokenizer, [p + " " + r for p, r in zip(prompts, responses)], True)
    empty = _tokenize(tokenizer, [""], True)[0]
    eos = _eos_id(tokenizer)

  if chat_template:
    # Where the conversation's tokens do not start with the prompt's (a token merged across the
    # boundary), the rule is concatenation: prompt tokens + the tokens of the rest of the rendered
    # conversation, i.e. what a model sees when it generates the response after the prompt.
    redo = [i for i, (p, f) in enumerate(zip(p_ids, f_ids)) if f[:len(p)] != p]
    for i in redo:
      if not f_text[i].startswith(p_text[i]):
        raise ValueError(
            f"Example {i}: the chat template renders the prompt differently once the assistant message "
            f"is added (the prompt text {p_text[i][-60:]!r} is not a prefix of the conversation's text "
            f"{f_text[i][:len(p_text[i]) + 20][-80:]!r}); this template cannot be used with "
            "chat_template=True; use chat_template=False.")
    rests = _tokenize(tokenizer, [f_text[i][len(p_text[i]):] for i in redo], False)
    for i, rest in zip(redo, rests):
      f_ids[i] = p_ids[i] + rest

  parts = []
  for i, (p, f) in enumerate(zip(p_ids, f_ids)):
    if chat_template:
      suffix = f[len(p):]
      cut = next((j for j, t in enumerate(suffix) if t in special), None)
      if cut is None:
        response, end = suffix, []
      else:
        response, end = suffix[:cut], [suffix[cut]]
    else:
      if f[:len(p)] == p:
        response = f[len(p):]
      else:  # the boundary merged into one token: tokenize the response on its own
        response = _tokenize(tokenizer, [" " + responses[i]], False)[0]
      end = [eos] if eos is not None else []
    if not response:
      raise ValueError(f"Example {i}: the response {responses[i]!r} has no tokens.")
    header = _common_prefix(empty, p)
    footer = _common_prefix(empty[header:][::-1], p[header:][::-1])
    parts.append(_Parts(p, response, end, header, footer))
  return parts


def _truncate_prompt(part: _Parts, budget: int) -> list[int]:
  """The prompt cut to ``budget`` tokens from the left of its content, keeping the template's header
  (system prompt, role markers) and footer (generation prompt) when they fit."""
  p = part.prompt
  if len(p) <= budget:
    return p
  keep = budget - part.header - part.footer
  if keep >= 1:
    return p[:part.header] + p[len(p) - part.footer - keep:]
  return p[len(p) - budget:]


LossOn = Literal["response", "all"]


def _assemble(part: _Parts, max_len: int, index: int, *, with_end: bool = True,
              loss_on: LossOn = "response") -> Encoded:
  tail = part.response + (part.end if with_end else [])
  if len(tail) + 1 > max_len:
    raise ValueError(
        f"Example {index}: the response needs {len(tail)} tokens (with end-of-turn) plus at least one "
        f"prompt token, more than max_len={max_len}; raise seq_len or shorten the response.")
  prompt = _truncate_prompt(part, max_len - len(tail))
  ids = np.asarray(prompt + tail, np.int32)
  mask = np.zeros(len(ids), np.float32)
  if loss_on == "response":
    mask[len(prompt):] = 1.0
  elif loss_on == "all":
    mask[1:] = 1.0  # every token that has a predecessor
  else:
    raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}.")
  return ids, mask


def encode_examples(tokenizer, examples: Sequence[Example], *, chat_template: bool, max_len: int,
                    system_prompt: str | None = None, loss_on: LossOn = "response") -> list[Encoded]:
  """:func:`encode_example` for many examples (batched rendering and tokenization)."""
  parts = _encode_parts(tokenizer, [e.prompt for e in examples], [e.response for e in examples],
                        chat_template=chat_template, system_prompt=system_prompt)
  return [_assemble(p, max_len, i, loss_on=loss_on) for i, p in enumerate(parts)]


def encode_example(tokenizer, prompt: str, response: str, *, chat_template: bool, max_len: int,
                   system_prompt: str | None = None, loss_on: LossOn = "response") -> Encoded:
  """Token ids and the token mask of one prompt/response pair.

  With ``chat_template`` (and a tokenizer that has one; otherwise the plain format below is used):
  the prompt is ``apply_chat_template([user], add_generation_prompt=True)`` and the full sequence
  the conversation with the assistant message. When the prompt's tokens are a prefix of the full
  sequence's tokens, the response span is what follows them; otherwise (a token merged across the
  boundary, e.g. a generation prompt ending in a space) the full sequence is the concatenation
  ``tokens(prompt text) + tokens(rest of the conversation text)``; a template whose prompt text is
  not a prefix of the conversation text raises ValueError. The mask covers the response tokens and the first
  special token after them (the end-of-turn, e.g. ``<|im_end|>``); template tokens after it (a
  trailing newline) are dropped. ``system_prompt=None`` keeps the template's default (SmolLM2's
  injects "You are a helpful AI assistant named SmolLM, trained by Hugging Face"); a string (even
  empty) is sent as a system message instead.

  Without: ``prompt + " " + response`` tokenized with the tokenizer's special tokens (BOS if it adds
  one), then EOS; the mask covers the response tokens and EOS. A ``system_prompt`` is prepended to
  the prompt followed by a newline.

  Too long prompts lose tokens from the left of their content (the template's header and generation
  prompt are kept); a response that does not fit ``max_len`` with one prompt token raises ValueError.

  ``loss_on="all"`` trains on every token instead (template, prompt and response; all but the first).

  Returns: ids [L] int32 and token_mask [L] float32 with L <= max_len; token_mask[i] = 1 if token i
  is trained on (predicted from token i-1).
  """
  return encode_examples(tokenizer, [Example(prompt, response)], chat_template=chat_template,
                         max_len=max_len, system_prompt=system_prompt, loss_on=loss_on)[0]


def encode_texts(tokenizer, texts: Sequence[str], *, max_len: int) -> list[Encoded]:
  """:func:`encode_text` for many texts, concatenated."""
  if max_len < 2:
    raise ValueError("max_len must be at least 2.")
  eos = _eos_id(tokenizer)
  out: list[Encoded] = []
  for ids in _tokenize(tokenizer, list(texts), True):
    if eos is not None:
      ids = ids + [eos]
    step = max_len - 1
    start = 0
    while True:
      piece = np.asarray(ids[start:start + max_len], np.int32)
      mask = np.ones(len(piece), np.float32)
      mask[0] = 0.0
      out.append((piece, mask))
      if start + max_len >= len(ids):
        break
      start += step
  return out


def encode_text(tokenizer, text: str, *, max_len: int) -> list[Encoded]:
  """One document for language modelling, chunked: ``tokens = tok(text) (+BOS if the tokenizer adds
  one) + EOS`` cut into pieces of at most ``max_len`` tokens that overlap by one token, so that every
  token but the first is predicted exactly once (token_mask is 1 everywhere but position 0).

  Returns a list of (ids [L] int32, token_mask [L] float32), L <= max_len.
  """
  return encode_texts(tokenizer, [text], max_len=max_len)


def encode_task_examples(tokenizer, examples: Sequence[AnyExample], *, max_len: int, chat_template: bool,
                         system_prompt: str | None = None, loss_on: LossOn = "response") -> list[Encoded]:
  """Examples -> encoded pieces (prompt/response pairs or chunked texts; texts train on every token
  whatever ``loss_on`` says)."""
  if not examples:
    raise ValueError("No examples to encode.")
  if all(isinstance(e, TextExample) for e in examples):
    return encode_texts(tokenizer, [e.text for e in examples], max_len=max_len)
  if all(isinstance(e, Example) for e in examples):
    return encode_examples(tokenizer, examples, chat_template=chat_template, max_len=max_len,
                           system_prompt=system_prompt, loss_on=loss_on)
  raise ValueError("Examples must be all Example or all TextExample.")
