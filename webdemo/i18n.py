"""Page texts in English and Chinese.

Static labels go to the browser through `gr.I18n`, which picks the language from the browser's
locale. Texts made on the server while answering (the readout, error messages) follow the
request's Accept-Language header through `pick_language` and `say`.
"""
from __future__ import annotations

import gradio as gr

EN = {
    "subtitle": "An open bilingual chat model, running on this server.",
    "random_notice": "⚠️ This page runs a **tiny random test model**: its answers are random text, "
                     "useful only to try the interface.",
    "placeholder": "Type a message and press Enter",
    "send": "Send",
    "stop": "Stop",
    "reset": "Reset",
    "max_length": "Maximum length",
    "max_length_info": "Prompt plus answer, in tokens",
    "top_p": "Top-p",
    "temperature": "Temperature",
    "temperature_info": "0 = always the most likely word",
    "system_prompt": "System prompt",
    "download_html": "Download HTML",
    "download_json": "Download JSON",
    "empty_chat": "Ask anything, in English or Chinese.",
    "conversations": "Conversations",
    "new_chat": "New chat",
    "title": "Title",
    "rename": "Rename",
    "delete_chat": "Delete",
    "import_json": "Import JSON",
    "settings": "Settings",
    "search": "Search titles",
    "undo_delete": "Undo delete",
}

ZH = {
    "subtitle": "开源中英双语对话模型，运行在本服务器上。",
    "random_notice": "⚠️ 本页面运行的是**微型随机测试模型**：回答是随机文字，只用于试用界面。",
    "placeholder": "输入消息，按回车发送",
    "send": "发送",
    "stop": "停止",
    "reset": "清空",
    "max_length": "最大长度",
    "max_length_info": "提示加回答的 token 数",
    "top_p": "Top-p",
    "temperature": "温度",
    "temperature_info": "0 = 总是选择最可能的词",
    "system_prompt": "系统提示词",
    "download_html": "下载 HTML",
    "download_json": "下载 JSON",
    "empty_chat": "用中文或英文问任何问题。",
    "conversations": "对话",
    "new_chat": "新对话",
    "title": "标题",
    "rename": "重命名",
    "delete_chat": "删除",
    "import_json": "导入 JSON",
    "settings": "设置",
    "search": "搜索标题",
    "undo_delete": "撤销删除",
}

# Texts composed on the server: str.format templates.
MESSAGES = {
    "en": {
        "speed": "{speed:.1f} tokens/s",
        "context": "context {used} / {limit} tokens",
        "dropped": "{count} older turn(s) left out of the model's context",
        "queued": "waiting in line: {position}",
        "stopped": "stopped",
        "truncated": "answer cut at the maximum length",
        "failed": "the answer failed: {error}",
        "cut_off": "the answer was cut off and is incomplete: {error}",
        "trimmed": "This chat was longer than the server accepts: its oldest turns were removed.",
        "busy": "The server is busy: please try again in a moment.",
        "refused_busy": "Not started: {reason}.",
        "store_unreadable": "The conversations kept in this browser could not be read (the server's key has "
                            "changed, or they were altered): a new, empty list was started.",
        "invalid": "Invalid request: {error}",
        "range": "{name} must be between {low} and {high}, got {value!r}.",
        "number": "{name} must be a number, got {value!r}.",
        "empty": "The message is empty.",
        "too_long": "The message is too long: {length} characters, at most {limit}.",
        "history": "The history must be a list of [user message, answer] pairs.",
        "too_many": "the conversation has more than {count} messages; at most {limit} are accepted: "
                    "start a new conversation or send fewer turns",
        "untitled": "New chat",
        "too_many_chats": "At most {limit} conversations are kept in this browser: delete one to start another.",
        "store_full": "This browser's storage for conversations is full ({used} of {limit} KiB): "
                      "delete or shorten a conversation to go on.",
        "answer_cut_store": "The answer was cut: this browser's storage for conversations is full.",
        "import_refused": "This file cannot be imported: {error}. Nothing was changed.",
        "no_message": "There is no user message at that place.",
        "tool_called": "🛠 Called `{name}`",
        "tool_result": "📎 Result of `{name}`",
        "thinking": "💭 Thinking",
        "thinking_running": "💭 Thinking…",
        "tools_left_out": "This model cannot call tools: the tool calls and results in this chat are shown "
                          "but not sent to it.",
    },
    "zh": {
        "speed": "{speed:.1f} token/秒",
        "context": "上下文 {used} / {limit} token",
        "dropped": "较早的 {count} 轮对话未放入模型上下文",
        "queued": "排队中：第 {position} 位",
        "stopped": "已停止",
        "truncated": "回答达到最大长度被截断",
        "failed": "回答出错：{error}",
        "cut_off": "回答被中断，内容不完整：{error}",
        "trimmed": "本对话超出服务器的长度限制：最早的几轮已删除。",
        "busy": "服务器繁忙，请稍后再试。",
        "refused_busy": "未开始：{reason}。",
        "store_unreadable": "无法读取本浏览器保存的对话（服务器密钥已更换，或数据被改动）：已新建一个空的对话列表。",
        "invalid": "请求无效：{error}",
        "range": "{name} 必须在 {low} 与 {high} 之间，收到 {value!r}。",
        "number": "{name} 必须是数字，收到 {value!r}。",
        "empty": "消息为空。",
        "too_long": "消息太长：{length} 个字符，最多 {limit} 个。",
        "history": "history 必须是 [用户消息, 回答] 对的列表。",
        "too_many": "对话超过 {count} 条消息；最多接受 {limit} 条：请开始新对话或少发几轮",
        "untitled": "新对话",
        "too_many_chats": "本浏览器最多保存 {limit} 个对话：请先删除一个再新建。",
        "store_full": "本浏览器的对话存储已满（{used} / {limit} KiB）：请删除或缩短一个对话后再继续。",
        "answer_cut_store": "回答被截断：本浏览器的对话存储已满。",
        "import_refused": "无法导入此文件：{error}。没有任何改动。",
        "no_message": "该位置没有用户消息。",
        "tool_called": "🛠 调用 `{name}`",
        "tool_result": "📎 `{name}` 的结果",
        "thinking": "💭 思考过程",
        "thinking_running": "💭 思考中…",
        "tools_left_out": "此模型不能调用工具：本对话中的工具调用和结果只显示，不发送给模型。",
    },
}

PAGE_TEXTS = gr.I18n(en=EN, zh=ZH, **{"zh-CN": ZH, "zh-TW": ZH, "zh-HK": ZH})


def pick_language(accept_language: str | None) -> str:
    """'zh' when the browser prefers Chinese over English, else 'en'."""
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag.startswith("en"):
            return "en"
    return "en"


def say(lang: str, key: str, **values) -> str:
    return MESSAGES.get(lang, MESSAGES["en"])[key].format(**values)
