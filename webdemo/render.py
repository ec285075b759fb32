"""Message text for the chat window and for the downloadable transcript.

Nothing a user or the model writes may become HTML. Two layers see to it:

1. `escape_markdown` keeps Markdown but makes raw HTML literal: in prose `&` and `<` become
   entities, Markdown images become plain text (no remote loads, no `onerror`), and links whose
   target is not http(s)/mailto lose their link syntax (`javascript:` and friends). Code blocks
   and code spans are left as they are, since Markdown already shows them literally.
2. What Markdown then produces is sanitised again: by the Chatbot in the browser, and for the
   transcript by `sanitize_html`, an allowlist that turns every other tag into visible text.

The transcript is rendered with mdtex2html (formulas as MathML), so it opens offline.
"""
from __future__ import annotations

import functools
import html
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser

import mdtex2html
from markdown_it import MarkdownIt

_BLOCKS = MarkdownIt("commonmark").enable("table")

_CODE_SPAN = re.compile(r"(?<![`\\])(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_LINK_TARGET = re.compile(r"\]\((\s*(?:&lt;)?\s*)([^\s)]*)")
_LINK_DEFINITION = re.compile(r"^( {0,3})\[([^\]\n]*)\]:([ \t]*(?:&lt;)?)(\S*)", re.M)
_SAFE_TARGET = re.compile(r"(https?://|mailto:)", re.I)
# $$...$$, \[...\], \(...\), $...$ (Pandoc's rule: no space just inside the dollars and no digit
# right after the closing one, so "$5 and $10" is prose).
_MATH = re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<![\\$])\$(?=\S)[^$\n]+?(?<=\S)\$(?![$\d])", re.S)
# A Python-style name with double underscores (__init__): CommonMark would make it bold.
_DUNDER = re.compile(r"(?<![\w\\])__(?=\w)(\w+?)__(?!\w)")
# Text the browser's math finder would take as a delimiter, outside the formulas the server found:
# shown as the characters they stand for (Markdown's own reading), never as math.
_STRAY_DELIMITERS = {"$$": "&#36;&#36;", "\\[": "&#91;", "\\]": "&#93;", "\\(": "&#40;", "\\)": "&#41;"}
_STRAY = re.compile("|".join(re.escape(d) for d in _STRAY_DELIMITERS))
_TEXT_GROUP = re.compile(r"\\(?:text|mbox|mathrm|textrm|textbf|operatorname)\s*\{[^{}]*\}")
_NOT_MATH = re.compile("[\u2010-\u206f\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]")
_CODE_OR_MATH = re.compile(f"{_CODE_SPAN.pattern}|{_MATH.pattern}", re.S)
# Formulas rendered as MathML in one transcript; the rest stay as text (see message_html).
MAX_FORMULAS = 500
# Brackets as entities: they print as brackets but can start neither a link nor \[ math.
_OPEN, _CLOSE = "&#91;", "&#93;"

# Chat-window delimiters for the bundled KaTeX. No single "$": the browser would take any two
# dollars for a formula; chat_markdown writes the $...$ that follow Pandoc's rule as \(...\).
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
]


@dataclass(frozen=True)
class Segment:
    """A piece of a message: "prose", "block" (fenced or indented code), "span" (inline code) or
    "math". `text` is the source; blocks also carry their info string and inner code."""

    kind: str
    text: str
    info: str = ""
    code: str = ""


def segments(text: str, keep_math: bool = False) -> list[Segment]:
    """Split Markdown into code blocks (as CommonMark parses them), code spans, math and prose.
    Paragraphs are split apart first: a code span cannot cross a blank line."""
    lines = text.split("\n")
    blocks = sorted((token for token in _BLOCKS.parse(text) if token.type in ("fence", "code_block") and token.map),
                    key=lambda token: token.map[0])
    out: list[Segment] = []

    def add_prose(chunk: str) -> None:
        pattern = _CODE_OR_MATH if keep_math else _CODE_SPAN
        for paragraph in re.split(r"(\n[ \t]*\n)", chunk):
            last = 0
            for match in pattern.finditer(paragraph):
                out.append(Segment("prose", paragraph[last:match.start()]))
                out.append(Segment("span" if match[0].startswith("`") else "math", match[0], code=match[2] or ""))
                last = match.end()
            out.append(Segment("prose", paragraph[last:]))

    line = 0
    for token in blocks:
        start, end = token.map
        if start < line:  # nested in a block already taken
            continue
        if start > line:
            add_prose("\n".join(lines[line:start]) + "\n")
        block = "\n".join(lines[start:end]) + ("\n" if end < len(lines) else "")
        out.append(Segment("block", block, info=token.info.strip(), code=token.content))
        line = end
    if line < len(lines):
        add_prose("\n".join(lines[line:]))
    return [s for s in out if s.text]


def _escape_prose(text: str) -> str:
    """Raw HTML characters, images and unsafe links in text that is not code."""
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    text = text.replace("![", "!" + _OPEN)

    def link(match: re.Match) -> str:
        return match[0] if _SAFE_TARGET.match(match[2]) else _CLOSE + match[0][1:]

    text = _LINK_TARGET.sub(link, text)

    def definition(match: re.Match) -> str:
        if _SAFE_TARGET.match(match[4]):
            return match[0]
        return f"{match[1]}{_OPEN}{match[2]}{_CLOSE}:{match[3]}{match[4]}"

    return _LINK_DEFINITION.sub(definition, text)


def escape_markdown(text: str, keep_math: bool = False) -> str:
    """Markdown whose raw HTML, images and script links show as text (see the module docstring).

    keep_math leaves formulas as written, for converters that read LaTeX themselves (mdtex2html);
    the chat window's KaTeX reads the page text, where entities are already decoded."""
    text = text.replace("\r\n", "\n")
    return "".join(_escape_prose(s.text) if s.kind == "prose" else s.text for s in segments(text, keep_math))


def _looks_like_math(text: str) -> bool:
    """False for "formulas" with CJK characters or typographic punctuation outside \\text{...}:
    random or garbled text between two delimiters, which KaTeX would render as a mess (and warn
    about, once per character, on every streamed update)."""
    return not _NOT_MATH.search(_TEXT_GROUP.sub("", text))


def _window_math(text: str) -> str:
    """A formula as the chat window's KaTeX reads it: $...$ as \\(...\\); escaped as prose (the
    browser reads the page text, where entities are decoded). One that does not look like maths
    is prose."""
    if not _looks_like_math(text):
        return _window_prose(text)
    if text.startswith("$") and not text.startswith("$$"):
        text = f"\\({text[1:-1]}\\)"
    return _escape_prose(text)


def _window_prose(text: str) -> str:
    text = _STRAY.sub(lambda match: _STRAY_DELIMITERS[match[0]], _escape_prose(text))
    return _DUNDER.sub(r"\\_\\_\1\\_\\_", text)


def chat_markdown(text: str) -> str:
    """Message text for the chat window: escaped as escape_markdown does, formulas only where
    the server found them (Pandoc's rule for dollars), so that the browser's math finder (which
    takes any pair of delimiters) never sees a stray one, and __names__ stay literal."""
    text = text.replace("\r\n", "\n")
    parts = {"prose": _window_prose, "math": _window_math}
    return "".join(parts[s.kind](s.text) if s.kind in parts else s.text for s in segments(text, keep_math=True))


def chat_message(role: str, content: str) -> dict:
    """One Chatbot message. A text block (not a bare string) keeps code indentation intact."""
    return {"role": role, "content": {"type": "text", "text": chat_markdown(content)}}


def thinking_message(title: str, thinking: str) -> dict:
    """A reasoning model's thinking as a collapsed, titled Chatbot message (Gradio's metadata
    message), shown above its answer; the text is the model's, escaped as answers are."""
    return {"role": "assistant", "content": {"type": "text", "text": chat_markdown(thinking)},
            "metadata": {"title": title, "status": "done"}}


def code_block(text: str, language: str = "") -> str:
    """`text` as a fenced code block, shown literally: the fence is longer than any run of
    backticks in it, so nothing in the text can close it."""
    runs = re.findall(r"`+", text)
    fence = "`" * max(3, 1 + max(map(len, runs), default=0))
    return f"{fence}{language}\n{text}\n{fence}"


def tool_arguments_text(arguments: str) -> str:
    """A call's arguments (a JSON object, checked when stored) indented for reading."""
    return json.dumps(json.loads(arguments), ensure_ascii=False, indent=2)


def tool_message(title: str, text: str, language: str = "") -> dict:
    """A tool call or a tool result as a collapsed Chatbot message (Gradio's metadata message).
    The title is Markdown the server writes (a tool name is letters, digits, _ and -); the text
    is shown as a code block."""
    return {"role": "assistant", "content": {"type": "text", "text": code_block(text, language)},
            "metadata": {"title": title, "status": "done"}}


# ---- the downloadable transcript --------------------------------------------------------------

_ALLOWED_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "em", "strong", "b", "i", "del", "s", "code",
    "pre", "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "a", "div", "span",
    # MathML, as latex2mathml writes it
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msup", "msub", "msubsup", "mfrac", "msqrt",
    "mroot", "mover", "munder", "munderover", "mtable", "mtr", "mtd", "mstyle", "mpadded", "mphantom",
    "menclose", "merror", "mfenced", "semantics", "annotation", "font",
}
_ALLOWED_ATTRIBUTES = {
    "class", "align", "style", "href", "xmlns", "display", "mathvariant", "stretchy", "fence", "separator",
    "lspace", "rspace", "accent", "accentunder", "movablelimits", "columnalign", "columnspacing",
    "rowspacing", "columnlines", "rowlines", "frame", "displaystyle", "scriptlevel", "width", "height",
    "depth", "linethickness", "notation", "open", "close", "separators", "minsize", "maxsize", "symmetric",
    "largeop", "form", "encoding",
}
_SAFE_STYLE = re.compile(r"^\s*((text-align|color|display)\s*:\s*[#\w-]+\s*;?\s*)+$")
_VOID_TAGS = {"br", "hr", "mspace"}


class _Sanitizer(HTMLParser):
    """Allowlisted tags and attributes pass; any other tag is written out as visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []

    def _attributes(self, attrs) -> str:
        kept = []
        for name, value in attrs:
            value = value or ""
            if name not in _ALLOWED_ATTRIBUTES:
                continue
            if name == "href" and not _SAFE_TARGET.match(value.strip()):
                continue
            if name == "style" and not _SAFE_STYLE.match(value):
                continue
            kept.append(f' {name}="{html.escape(value, quote=True)}"')
        return "".join(kept)

    def handle_starttag(self, tag, attrs):
        if tag in _ALLOWED_TAGS:
            rel = ' rel="noopener noreferrer"' if tag == "a" else ""
            self.out.append(f"<{tag}{self._attributes(attrs)}{rel}>")
        else:
            self.out.append(html.escape(self.get_starttag_text() or f"<{tag}>"))

    def handle_startendtag(self, tag, attrs):
        if tag in _ALLOWED_TAGS:
            self.out.append(f"<{tag}{self._attributes(attrs)} />")
        else:
            self.out.append(html.escape(self.get_starttag_text() or f"<{tag} />"))

    def handle_endtag(self, tag):
        if tag in _ALLOWED_TAGS and tag not in _VOID_TAGS:
            self.out.append(f"</{tag}>")
        elif tag not in _ALLOWED_TAGS:
            self.out.append(html.escape(f"</{tag}>"))

    def handle_data(self, data):
        self.out.append(html.escape(data, quote=False))

    def handle_comment(self, data):
        pass

    def unknown_decl(self, data):
        pass


def sanitize_html(fragment: str) -> str:
    """An HTML fragment with only allowlisted tags and attributes; other tags become text."""
    sanitizer = _Sanitizer()
    sanitizer.feed(fragment)
    sanitizer.close()
    return "".join(sanitizer.out)


def _code_html(segment: Segment) -> str:
    """Code, or a formula left as text, as literal HTML."""
    if segment.kind == "math":
        return f"<code>{html.escape(segment.text)}</code>"
    if segment.kind == "span":
        code = segment.code
        if code.startswith(" ") and code.endswith(" ") and code.strip():
            code = code[1:-1]
        return f"<code>{html.escape(code)}</code>"
    language = segment.info.split()[0] if segment.info else ""
    css = f' class="language-{html.escape(language)}"' if language else ""
    return f"<pre><code{css}>{html.escape(segment.code)}</code></pre>"


def message_html(text: str, max_formulas: int = MAX_FORMULAS) -> str:
    """One finished message as HTML with MathML formulas, safe to open in a browser."""
    return _message_html(text, max_formulas)[0]


@functools.lru_cache(maxsize=512)
def _message_html(text: str, max_formulas: int) -> tuple[str, int]:
    """message_html, and how many formulas became MathML.

    Code is rendered here and hidden from mdtex2html behind placeholders (it splits on every
    backtick and cannot handle an unclosed fence); prose and formulas go through mdtex2html.
    Each formula costs about a millisecond there, so those beyond `max_formulas` stay as text."""
    nonce = secrets.token_hex(4)
    code: dict[str, str] = {}
    parts = []
    formulas = 0
    for segment in segments(text.replace("\r\n", "\n"), keep_math=True):
        if segment.kind == "math" and formulas < max_formulas:
            formulas += 1
            parts.append(segment.text)
        elif segment.kind == "prose":
            parts.append(_escape_prose(segment.text))
        else:
            key = f"CodePlaceholder{nonce}N{len(code)}E"
            code[key] = _code_html(segment)
            parts.append(f"\n\n{key}\n\n" if segment.kind == "block" else key)
    try:
        rendered = mdtex2html.convert("".join(parts), extensions=["tables", "nl2br"])
    except Exception:  # mdtex2html gives up on some inputs: show the text as it is
        return f"<pre>{html.escape(text)}</pre>", 0
    rendered = sanitize_html(rendered)
    for key, fragment in code.items():
        rendered = rendered.replace(f"<p>{key}</p>", fragment).replace(key, fragment)
    return rendered, formulas


_PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "PingFang SC", "Microsoft YaHei", sans-serif;
       max-width: 820px; margin: 2rem auto; padding: 0 1rem; line-height: 1.6; color: #1f2328; }
h1 { font-size: 1.4rem; } .meta { color: #59636e; font-size: .9rem; }
.message { border-radius: 10px; padding: .2rem 1rem; margin: 1rem 0; }
.user { background: #eef4ff; } .assistant { background: #f6f8fa; } .tool { background: #fbf8ef; }
summary { cursor: pointer; }
.role { font-weight: 600; font-size: .85rem; color: #59636e; margin-top: .6rem; }
pre { background: #fff; border: 1px solid #d1d9e0; border-radius: 6px; padding: .6rem; overflow-x: auto; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
table { border-collapse: collapse; } th, td { border: 1px solid #d1d9e0; padding: .3rem .6rem; }
.blockformula { text-align: center; margin: .6rem 0; }
"""


def _tool_sections(message: dict, names: dict[str, str]) -> list[str]:
    """A tool call message (its text, then each call) or a tool result as collapsed sections;
    `names` learns each call's tool name, for its result."""
    sections = []
    for call in message.get("tool_calls", ()):
        name = names[call["id"]] = call["function"]["name"]
        sections.append(_details(f"🛠 Tool call / 工具调用: {name}", tool_arguments_text(call["function"]["arguments"]),
                                 "json"))
    if message["role"] == "tool":
        sections.append(_details(f"📎 Tool result / 工具结果: {names.get(message['tool_call_id'], '?')}",
                                 message["content"]))
    return sections


def _details(summary: str, text: str, language: str = "") -> str:
    css = f' class="language-{language}"' if language else ""
    return (f'<details class="message tool"><summary class="role">{html.escape(summary)}</summary>'
            f"<pre><code{css}>{html.escape(text)}</code></pre></details>")


def conversation_html(history: list[dict], model_name: str, exported_at: datetime | None = None,
                      title: str = "") -> str:
    """A self-contained HTML page of the conversation (no scripts, no remote resources), headed
    with its title (by default the model's name); tool calls and results are collapsed sections
    (<details>, no script needed)."""
    exported_at = exported_at or datetime.now(timezone.utc)
    roles = {"user": "User / 用户", "assistant": f"{model_name}"}
    parts = []
    names: dict[str, str] = {}
    formulas_left = MAX_FORMULAS
    for message in history:
        role = message["role"]
        if role != "tool" and (message["content"] or "tool_calls" not in message):  # a call's text, if any
            body, formulas = _message_html(message["content"], formulas_left)
            formulas_left -= formulas
            parts.append(f'<section class="message {html.escape(role)}">'
                         f'<div class="role">{html.escape(roles.get(role, role))}</div>'
                         f'{body}</section>')
        parts += _tool_sections(message, names)
    title = html.escape(title or f"{model_name} conversation")
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{title}</title>\n<style>{_PAGE_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{title}</h1>\n<p class=\"meta\">{html.escape(exported_at.strftime('%Y-%m-%d %H:%M UTC'))}</p>\n"
        + "\n".join(parts) + "\n</body>\n</html>\n"
    )


_EXPORTED_KEYS = ("role", "tool_call_id", "content", "tool_calls")


def conversation_json(history: list[dict], model_name: str, exported_at: datetime | None = None) -> str:
    """The conversation as importing.read_export reads it back: messages in OpenAI's shape,
    tool calls and results included."""
    exported_at = exported_at or datetime.now(timezone.utc)
    messages = [{key: m[key] for key in _EXPORTED_KEYS if key in m} for m in history]
    return json.dumps({"model": model_name, "exported_at": exported_at.isoformat(timespec="seconds"),
                       "messages": messages}, ensure_ascii=False, indent=2) + "\n"
