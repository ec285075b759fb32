"""The command line: `python -m model_runtime chat --model PATH_OR_ID` (also installed as
`chatglm-chat --model PATH_OR_ID`) and `python -m model_runtime make-tiny DIR`.

chat: type a message and the answer streams. `clear` empties the history, `exit` or `stop` quits,
Ctrl+C stops the current answer and returns to the prompt (Ctrl+C at the prompt quits).
make-tiny: write a tiny random checkpoint (tests and offline demos; see model_runtime/tiny/).
"""
from __future__ import annotations

import argparse
import sys
import threading

from .chat.stream import sampling_with_defaults, stream_answer
from .loading.loader import load_model
from .models.config import CheckpointError
from .protocol import InvalidRequest
from .tiny.checkpoint import FAMILIES, write_tiny_checkpoint
from .tiny.glm6b import TinySize

WELCOME = "GLM terminal chat. Type a message; 'clear' empties the history, 'exit' or 'stop' quits, " \
          "Ctrl+C stops an answer."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model_runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_chat_arguments(commands.add_parser("chat", help="chat in the terminal"))
    make = commands.add_parser("make-tiny", help="write a tiny random checkpoint directory")
    make.add_argument("directory")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--layers", type=int, default=TinySize.num_layers)
    make.add_argument("--hidden-size", type=int, default=TinySize.hidden_size)
    make.add_argument("--family", default="chatglm", choices=FAMILIES,
                      help="which model's layout, tokenizer and chat format (default: ChatGLM-6B)")
    return parser.parse_args(argv)


def add_chat_arguments(chat: argparse.ArgumentParser) -> None:
    chat.add_argument("--model", default="THUDM/chatglm-6b", help="checkpoint directory or Hugging Face id")
    chat.add_argument("--device", default="auto", help="auto, cuda, cpu or mps")
    chat.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: per device)")
    chat.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                      help="quantize the weights to 4 or 8 bits while loading (less memory)")
    chat.add_argument("--adapter", default=None, metavar="DIR_OR_ID",
                      help="a LoRA adapter in PEFT's format (folder or Hugging Face id), merged into the weights")
    chat.add_argument("--ptuning-checkpoint", default=None, metavar="DIR",
                      help="a P-tuning v2 checkpoint folder (pytorch_model.bin with transformer.prefix_encoder.*)")
    chat.add_argument("--pre-seq-len", type=int, default=None, metavar="N",
                      help="the prefix length of --ptuning-checkpoint (default: read from it; if given, must match)")
    chat.add_argument("--max-length", type=int, default=None,
                      help="prompt plus answer, in tokens (default: the model's reference setting, 2048 for ChatGLM-6B)")
    chat.add_argument("--top-p", type=float, default=None, help="default: the model's reference setting")
    chat.add_argument("--temperature", type=float, default=None, help="0 means greedy; default: the model's")
    chat.add_argument("--system", default=None, help="a system prompt (ChatGLM3 / GLM-4; put before the first "
                      "question for the others)")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--hide-thinking", action="store_true",
                      help="a reasoning model's (GLM-Z1) thinking is not printed (by default it is, dimmed)")


DIM, NORMAL = "\033[2m", "\033[0m"


def stream_one_answer(model, tokenizer, query, history, args) -> list:
    """Print one streamed answer (a reasoning model's thinking first, dimmed, unless
    --hide-thinking); Ctrl+C stops it early. Returns the history with this turn (the visible
    reply only)."""
    cancel = threading.Event()
    params = sampling_with_defaults(tokenizer, args.max_length, args.top_p, args.temperature, seed=args.seed)
    answers = stream_answer(model, tokenizer, query, history, params, cancel, system=args.system)
    shown = thought = ""
    print("ChatGLM: ", end="", flush=True)
    try:
        for update in answers:
            if update.thinking != thought and not args.hide_thinking:
                print(f"{DIM}{update.thinking[len(thought):]}{NORMAL}", end="", flush=True)
            if update.text != shown:
                print(("\n" if thought and not shown and not args.hide_thinking else "") + update.text[len(shown):],
                      end="", flush=True)
            shown, thought = update.text, update.thinking
    except KeyboardInterrupt:
        cancel.set()
        for update in answers:  # let the generator end cleanly ("cancelled")
            shown = update.text
        print(" [stopped]", end="")
    print()
    return history + [(query, shown)]


def run_chat(args: argparse.Namespace) -> int:
    try:
        tokenizer, model = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                      adapter=args.adapter, ptuning_checkpoint=args.ptuning_checkpoint,
                                      pre_seq_len=args.pre_seq_len)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(WELCOME)
    for fine_tune in model.fine_tunes:
        print(f"with {fine_tune}")
    history: list = []
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query in ("exit", "stop"):
            return 0
        if query == "clear":
            history = []
            print("(history cleared)")
            continue
        if not query:
            continue
        try:
            history = stream_one_answer(model, tokenizer, query, history, args)
        except InvalidRequest as error:
            print(f"\n(error: {error})")


def make_tiny(args: argparse.Namespace) -> int:
    size = TinySize(hidden_size=args.hidden_size, num_layers=args.layers, inner_hidden_size=4 * args.hidden_size)
    print(write_tiny_checkpoint(args.directory, size, seed=args.seed, family=args.family))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_chat(args) if args.command == "chat" else make_tiny(args)


def chat_main(argv=None) -> int:
    """The `chatglm-chat` console script: `chat` without the subcommand's name."""
    parser = argparse.ArgumentParser(prog="chatglm-chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_arguments(parser)
    return run_chat(parser.parse_args(argv))
