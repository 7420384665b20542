"""Conversations and instructions as training documents: records of `messages` (role and
content, the chat-template convention) or of `prompt`/`completion`, rendered to text through a
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


def is_chat_record(obj) -> bool:
    return isinstance(obj, dict) and ("messages" in obj or ("prompt" in obj and "completion" in obj))


def parse_record(obj: dict, where: str) -> Conversation:
    """The conversation of a `messages` or `prompt`/`completion` record; UserError naming `where`
    (file:line) for one without an assistant turn, with an unknown role or a non-string content."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    else:
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": obj["system"]})
    clean = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} is not a {{role, content}} object")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i} ({m['role']}) has a {type(m['content']).__name__} content, "
                            "not a string")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise UserError(f"{where}: no assistant turn: nothing to train on (a conversation needs at least one "
                        "assistant message; a prompt/completion record, a completion)")
    return Conversation(clean, where)


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
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
