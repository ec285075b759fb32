"""How the chat page looks and what runs in the browser: example prompts, CSS, the theme, the
viewport tag and the two small scripts (the import's file picker, the focus after an answer)."""
from __future__ import annotations

import gradio as gr

from .importing import MAX_IMPORT_BYTES

EXAMPLES = [
    {"text": "用三句话介绍一下你自己。"},
    {"text": "写一首关于秋天的五言绝句。"},
    {"text": "Explain the Pythagorean theorem with a formula."},
    {"text": "Write a Python function that checks whether a string is a palindrome."},
]

CSS = """
/* the page is as wide as the window; the chat column is one width whatever it holds */
.gradio-container { width: 100% !important; max-width: 100% !important; margin: 0 auto !important; }
#main { width: 100%; max-width: 960px; margin: 0 auto; }
@media (min-width: 769px) {  /* an open sidebar pushes the page over instead of covering it */
  .sidebar-parent:has(.sidebar.open:not(.right)) { padding-left: 316px !important; }
  .sidebar-parent:has(.sidebar.open.right) { padding-right: 336px !important; }
}
#title { gap: 0; }
#title h1 { margin: 0; }
#title p { margin: .2rem 0 0; color: var(--body-text-color-subdued); }
#random-notice { border-left: 4px solid #f0b429; padding-left: .8rem; }
#readout { min-height: 1.5em; }
#readout p { margin: 0; font-size: var(--text-sm) !important; color: var(--body-text-color-subdued) !important; }
/* one width whatever the chat holds: the column fills the page, the chat fills the column */
#chatbot { width: 100% !important; }
#chatbot .message pre { white-space: pre; overflow-x: auto; max-width: 100%; }
#chatbot .message pre, #chatbot .message code { font-size: .95em; }
#chatbot .message-content { overflow-wrap: anywhere; }
#chatbot button.example { cursor: pointer; border: 1px solid var(--border-color-primary); }
#chatbot button.example:hover { border-color: var(--color-accent); }
#composer { gap: .5rem; }
#send, #stop { min-width: 80px; }
#below-chat { margin-top: -.5rem; align-items: center; }
#max-length label span, #max-length .head label { white-space: nowrap; }
/* flex items grow to their content's width unless allowed to shrink: a long code line would
   widen the whole page on a phone (its pre scrolls instead) */
.gradio-container, .gradio-container .main, .gradio-container .wrap, .gradio-container .contain, #layout,
#chatbot .wrapper, #chatbot .bubble-wrap, #chatbot .message-row, #chatbot .flex-wrap, #chatbot .message {
  min-width: 0 !important;
}
/* the conversation list scrolls inside the sidebar; the buttons under it stay in view */
#conversations { max-height: min(45vh, 420px); overflow-y: auto; }
#conversations .wrap { flex-direction: column; gap: .25rem; }
#conversations label { width: 100%; min-width: 0; }
#conversations label span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#cap-note p { font-size: var(--text-sm); color: var(--body-text-color-subdued); margin: 0; }
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
}
"""

# Gradio's page has no viewport tag: a phone would lay it out 980 px wide and zoom out.
HEAD = '<meta name="viewport" content="width=device-width, initial-scale=1">'

# Import: the browser reads the picked file and sends its first MAX_IMPORT_BYTES + 1 bytes as base64
# in place of the hidden input's value (so the server sees a file that is too big, and says so).
PICK_IMPORT_JS = """async (_, ...rest) => {
  const input = Object.assign(document.createElement("input"), {type: "file", accept: ".json,application/json"});
  input.style.display = "none";
  document.body.appendChild(input);
  const file = await new Promise((resolve) => {
    input.addEventListener("change", () => resolve(input.files[0] || null));
    input.addEventListener("cancel", () => resolve(null));
    input.click();
  });
  input.remove();
  if (!file) return [null, ...rest];
  const bytes = new Uint8Array(await file.slice(0, %d).arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return [btoa(binary), ...rest];
}""" % (MAX_IMPORT_BYTES + 1)

# On a phone the sidebar is a drawer over the page: closed at first, and again once a chat is picked.
CLOSE_DRAWER_ON_PHONE = """() => {
  if (window.innerWidth > 768) return;
  for (const panel of document.querySelectorAll('.sidebar.open')) panel.querySelector('.toggle-button')?.click();
}"""

TOGGLE_SETTINGS = "() => { document.querySelector('#settings .toggle-button')?.click(); }"

FOCUS_MESSAGE_BOX = "() => { document.querySelector('#message textarea')?.focus(); }"

THEME = gr.themes.Soft(font=["system-ui", "-apple-system", "Segoe UI", "Noto Sans CJK SC", "PingFang SC",
                             "Microsoft YaHei", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Noto Sans Mono CJK SC",
                                  "monospace"])
