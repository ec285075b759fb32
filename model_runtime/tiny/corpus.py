"""The text the tiny tokenizers are trained on: our own greetings, weather, chat turns, code,
numbers and punctuation, in Chinese and English."""
from __future__ import annotations

# Paragraphs (split on blank lines) are the training sentences.
TINY_CORPUS = """\
你好

你好！我是一个小小的测试模型，很高兴见到你。
Hello! I am a tiny test model. Nice to meet you.

Good morning, how are you today?
早上好，今天你过得怎么样？

[Round 0]
问：你好
答：你好👋！有什么可以帮你的吗？
[Round 1]
问：今天天气怎么样？
答：

今天是晴天，气温大约 25 度，适合出去散步。
The weather is sunny today, about 25 degrees, with a light wind from the east.

Tomorrow it will rain in the afternoon, so please bring an umbrella.
明天下午会下雨，请记得带伞。北京的冬天很冷，上海的夏天很热。
It is cold and windy in winter; summer is hot and humid.

def main():
    print('hello world')\t# greeting
    for i in range(10):
        total = total + i * 2
    return total

if __name__ == "__main__":
    main()

import torch
x = torch.zeros(3, 4)  # a 3x4 matrix

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

{"name": "ChatGLM", "layers": 28, "hidden": 4096}

1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 2048, 130528, 3.14159, -42
一二三四五六七八九十，百千万。
The price is $12.50 (twelve dollars and fifty cents).
Question: what is 7 + 8? Answer: 15.

Punctuation: , . ! ? ; : ' " ( ) [ ] { } < > / \\ | @ # % ^ & * - _ = + ~ `
中文标点：，。！？；：“”‘’（）【】《》、……——

Thank you very much. Goodbye, see you tomorrow!
谢谢你，再见，明天见！

机器学习和自然语言处理是人工智能的重要方向。
Machine learning and natural language processing are important parts of AI.

请用三句话介绍一下你自己。
Please introduce yourself in three sentences.

The quick brown fox jumps over the lazy dog.
我喜欢读书、写代码和听音乐。
I like reading books, writing code and listening to music.
"""

# Chat turns in ChatGLM2's round format and system prompts, for the later families' tokenizers.
CHAT_TEXT = """\
[Round 1]

问：你好

答：你好👋！我是人工智能助手 ChatGLM，很高兴见到你，欢迎问我任何问题。

[Round 2]

问：今天天气怎么样？

答：
You are a helpful assistant. 你是一个乐于助人的助手。
Please answer in English. 请用中文回答。
"""


def corpus_lines() -> list[str]:
    """Every non-empty line of both texts (the later families' training sentences)."""
    return [line for line in (TINY_CORPUS + "\n" + CHAT_TEXT).split("\n") if line.strip()]
