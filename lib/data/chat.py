"""Conversations and instructions as training documents: records of `messages` (role and
content, the chat-template convention), ShareGPT's `conversations` (from and value) or
`prompt`/`completion`, rendered to text through a
chat template, with the character spans of the assistant's turns, the only text the loss counts.

    doc = render(parse_record({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}, "a.jsonl:3"))
    doc.text     -> "<|user|>\\nhi\\n<|assistant|>\\nhello</s>"   (DEFAULT_TEMPLATE)
    doc.trained  -> [(26, 35)]                                      "hello</s>"

The spans come from the template itself: an assistant turn is what rendering the conversation up
to and including it adds to rendering the conversation before it with the generation prompt. A
template whose renderings do not extend each other that way is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lib.errors import UserError

ROLES = ("system", "user", "assistant")

# This project's template for tokenizers without one of their own. Its role markers are plain
# text, and an assistant turn ends with the eos token, so a model learns to stop: the pipeline
# renders with a stand-in for eos_token that it encodes as the eos id, since the eos string in a
# document's text is plain characters to the tokenizer. Exported into final/'s
# tokenizer_config.json with bos in front (CLIENT_PREFIX), so that apply_chat_template gives
# clients the ids training saw.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CLIENT_PREFIX = "{{ bos_token }}"


@dataclass
class Conversation:
    messages: list[dict]
    where: str  # file:line, for errors


@dataclass
class ChatDocument:
    text: str
    trained: list[tuple[int, int]]  # character spans of the assistant turns in `text`


# Role names of other layouts, mapped as axolotl and FastChat map ShareGPT's: `from` human/gpt.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
              "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
TURN_LISTS = ("messages", "conversations")  # a list of turns, each {role, content} or {from, value}


def is_chat_record(obj) -> bool:
    return isinstance(obj, dict) and (any(isinstance(obj.get(k), list) for k in TURN_LISTS)
                                      or ("prompt" in obj and "completion" in obj))


def parse_record(obj: dict, where: str) -> Conversation:
    """The conversation of a record: `messages` ({role, content} turns), ShareGPT's
    `conversations` ({from, value} turns, from human/gpt/system; either key takes either kind of
    turn), or `prompt`/`completion`, each with an optional top-level `system` string. A UserError
    naming `where` (file:line) for one without an assistant turn, with an unknown role or a
    non-string content."""
    key = next((k for k in TURN_LISTS if k in obj), None)
    if key is not None:
        messages = obj[key]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: {key!r} must be a non-empty list of {{role, content}} or {{from, value}} objects")
    else:
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    clean = []
    for i, m in enumerate(messages, 1):
        role_key = "role" if isinstance(m, dict) and "role" in m else "from"
        text_key = "content" if isinstance(m, dict) and "content" in m else "value"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise UserError(f"{where}: message {i} is neither a {{role, content}} nor a {{from, value}} object")
        role = ROLE_NAMES.get(m[role_key]) if isinstance(m[role_key], str) else None
        if role is None:
            raise UserError(f"{where}: message {i} has {role_key} {m[role_key]!r}; read are {', '.join(ROLES)} "
                            "(and ShareGPT's human, gpt)")
        if not isinstance(m[text_key], str):
            raise UserError(f"{where}: message {i} ({role}) has a {type(m[text_key]).__name__} {text_key}, "
                            "not a string")
        clean.append({"role": role, "content": m[text_key]})
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and not (clean and clean[0]["role"] == "system"):
        clean.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in clean):
        raise UserError(f"{where}: no assistant turn: nothing to train on (a conversation needs at least one "
                        "assistant message; a prompt/completion record, a completion)")
    return Conversation(clean, where)


@dataclass
class PreferencePair:
    prompt: list[dict]  # the turns before the responses (system, user, ...), shared by both
    chosen: dict  # the preferred assistant turn
    rejected: dict  # the other one
    where: str  # file:line, for errors

    def conversations(self) -> tuple[Conversation, Conversation]:
        return (Conversation(self.prompt + [self.chosen], self.where),
                Conversation(self.prompt + [self.rejected], self.where))


def parse_preference(obj: dict, where: str) -> PreferencePair:
    """The pair of a preference record, in trl's two layouts, each with an optional top-level
    `system` string:
    - strings: {"prompt": str, "chosen": str, "rejected": str};
    - conversations: `chosen` and `rejected` lists of turns that share every turn but the last,
      an assistant's; or (trl's explicit-prompt form) a `prompt` list of turns, and `chosen` and
      `rejected` each the assistant's turn(s) after it.
    A UserError naming `where` (file:line) for responses that are empty or identical, prompts that
    differ, a last turn that is not the assistant's, or a field of the wrong kind."""
    def turns(value, name):
        if isinstance(value, str):
            return [{"role": "user" if name == "prompt" else "assistant", "content": value}]
        if not (isinstance(value, list) and value):
            raise UserError(f"{where}: {name!r} must be a string or a non-empty list of turns, not "
                            f"{'an empty list' if isinstance(value, list) else type(value).__name__}")
        if name == "prompt":  # turns before the responses: no assistant's needed
            return parse_record({"messages": value + [{"role": "assistant", "content": ""}]}, where).messages[:-1]
        return parse_record({"messages": value}, where).messages

    chosen, rejected = turns(obj["chosen"], "chosen"), turns(obj["rejected"], "rejected")
    if "prompt" in obj:
        prompt = turns(obj["prompt"], "prompt")
        chosen, rejected = prompt + chosen, prompt + rejected
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last turn of {name!r} is the {conv[-1]['role']}'s, not the assistant's: "
                            "nothing to prefer")
        if not conv[-1]["content"].strip():
            raise UserError(f"{where}: the {name} response is empty")
    if chosen[:-1] != rejected[:-1]:
        turn = next(i for i, (a, b) in enumerate(zip(chosen, rejected + [None]), 1) if a != b)
        raise UserError(f"{where}: the chosen and rejected conversations differ before their last turn (at turn "
                        f"{turn}): a pair answers one prompt")
    if chosen[-1] == rejected[-1]:
        raise UserError(f"{where}: the chosen and rejected responses are identical: nothing to prefer")
    prompt = chosen[:-1]
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    if not any(m["role"] == "user" for m in prompt):
        raise UserError(f"{where}: no prompt: a pair needs the user's turn its responses answer")
    return PreferencePair(prompt, chosen[-1], rejected[-1], where)


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):  # what templates written for transformers call on bad input
        raise UserError(f"the chat template refused the conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except Exception as exc:  # noqa: BLE001 -- jinja2's TemplateSyntaxError and friends
        raise UserError(f"the chat template does not parse ({type(exc).__name__}: {exc})") from None


def render_text(template: str, messages: list[dict], add_generation_prompt: bool = False,
                bos_token: str = "", eos_token: str = "</s>") -> str:
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=bos_token, eos_token=eos_token)


def render(conv: Conversation, template: str = DEFAULT_TEMPLATE, eos_token: str = "</s>") -> ChatDocument:
    """The conversation as one document's text and its assistant spans (see the module's note)."""
    text = render_text(template, conv.messages, eos_token=eos_token)
    trained = []
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        before = render_text(template, conv.messages[:i], add_generation_prompt=True, eos_token=eos_token)
        upto = render_text(template, conv.messages[:i + 1], eos_token=eos_token)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UserError(f"{conv.where}: the chat template's rendering of the conversation up to message {i + 1} "
                            "does not extend its rendering before it, so the assistant's text cannot be located; "
                            "use a template whose turns are appended one after another")
        if len(upto) > len(before):
            trained.append((len(before), len(upto)))
    return ChatDocument(text, trained)


def token_mask(offsets: list[tuple[int, int]], trained: list[tuple[int, int]]) -> list[int]:
    """1 for each token (given by its character span) that starts inside a trained span, else 0."""
    mask, k = [], 0
    spans = sorted(trained)
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(int(k < len(spans) and spans[k][0] <= start < spans[k][1] and end > start))
    return mask


EOS_STAND_IN = "\ue000"  # a private-use character: where the template puts eos, encoded as the eos id


def encode_documents(tok, records: list[dict], template: str, add_bos: bool, add_eos: bool
                     ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(ids, loss mask, trained text bytes) of each corpus record, through `tok` (a Hugging Face
    fast tokenizer). A conversation (a record with `messages`) is rendered through `template`,
    its eos as the eos id; its mask is 1 on the assistant's tokens (their eos included) and 0 on
    bos and the prompt, and its bytes are the assistant's text. A plain record is trained on
    whole (mask 1 throughout, bos included, as packed training predicts it after the previous
    document). Documents are `bos ids eos` as `add_bos`/`add_eos` say; a conversation that ends
    with eos gets no second one. A preference pair (a record with `chosen` and `rejected`) gives two
    documents, its chosen conversation and then its rejected one."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    all_ids, all_masks, all_bytes = [], [], []
    # a preference pair is two documents side by side, its chosen conversation then its rejected
    records = [c for r in records for c in ([{**r, "messages": r["chosen"]}, {**r, "messages": r["rejected"]}]
                                           if "chosen" in r else [r])]
    for r in records:
        if "messages" not in r:
            ids = tok(r["text"], add_special_tokens=False, split_special_tokens=True).input_ids
            ids = [bos] * add_bos + ids + [eos] * add_eos
            all_ids.append(ids)
            all_masks.append([1] * len(ids))
            all_bytes.append(len(r["text"].encode("utf-8")))
            continue
        where = f"{r.get('source', '?')}:{r.get('line', '?')}"
        if any(EOS_STAND_IN in m["content"] for m in r["messages"]):
            raise UserError(f"{where}: a message holds U+E000, the character this project renders eos as")
        doc = render(Conversation(r["messages"], where), template, eos_token=EOS_STAND_IN)
        ids, offsets, start = [], [], 0
        for piece in doc.text.split(EOS_STAND_IN):
            if piece:
                enc = tok(piece, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc.input_ids
                offsets += [(start + a, start + b) for a, b in enc.offset_mapping]
            start += len(piece)
            if start < len(doc.text):  # the stand-in that ended this piece
                ids.append(eos)
                offsets.append((start, start + 1))
                start += 1
        mask = token_mask(offsets, doc.trained)
        tail = add_eos and (not ids or ids[-1] != eos)
        all_ids.append([bos] * add_bos + ids + [eos] * tail)
        all_masks.append([0] * add_bos + mask + [0] * tail)
        all_bytes.append(sum(len(doc.text[a:b].replace(EOS_STAND_IN, "").encode("utf-8")) for a, b in doc.trained))
    return all_ids, all_masks, all_bytes
