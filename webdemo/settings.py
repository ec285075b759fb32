"""Every setting of `python app.py`, defined once: its flag, its environment variable, its type,
choices, default and help. The argument parser, the reading of environment variables (which is
how a Hugging Face Space passes settings) and the table in docs/configuration.md are all made
from `SETTINGS`; tests/test_settings.py fails when the docs drift.

Precedence: a flag on the command line, else its environment variable, else the default. An
environment value goes through the same conversion and choices as the flag, and a bad one is
refused with the variable's name (exit status 2).
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from . import connections, limits
from .fair_share import DEFAULT_PER_CLIENT
from .hf_spaces import running_on_spaces

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
DEFAULT_MODEL = "THUDM/chatglm-6b"
TINY_FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4", "glm4-0414", "z1", "glm4-hf")
CONCURRENCY = {False: 64, True: 4}  # by ZeroGPU mode
QUEUE_SIZE = {False: 100, True: 32}


def number_in(kind: type, low: float, high: float, what: str, *, open_low: bool = False) -> Callable[[str], Any]:
    """A converter to `kind` that takes low..high (low excluded with open_low), else says `what`."""
    def convert(value: str):
        try:
            number = kind(value)
        except ValueError:
            number = math.nan
        if not ((low < number) if open_low else (low <= number)) or not number <= high or number == math.inf:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number
    return convert


positive_int = number_in(int, 1, math.inf, "a whole number >= 1")
non_negative_int = number_in(int, 0, math.inf, "a whole number >= 0")
positive_float = number_in(float, 0, math.inf, "a number > 0", open_low=True)
non_negative_float = number_in(float, 0, math.inf, "a number >= 0")
port_number = number_in(int, 0, 65535, "a port number")


def auth_pair(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return user, password


def switch(value: str) -> bool:
    """An on/off environment value (flags of this kind take no value on the command line)."""
    if value.lower() not in TRUE + FALSE:
        raise argparse.ArgumentTypeError(f"expected 1/true/yes/on or 0/false/no/off, got {value!r}")
    return value.lower() in TRUE


def comma_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def tiny_family(value: str) -> Optional[str]:
    """CHATGLM_TINY_RANDOM: 1/true means ChatGLM-6B, 0/false off, else a family name."""
    if value.lower() in FALSE:
        return None
    return "chatglm" if value.lower() in TRUE else value


@dataclass(frozen=True)
class Setting:
    """One setting. kind: "value" (takes a value), "switch" (a flag without a value; the variable
    says 1/0), "list" (repeatable flag; the variable is comma-separated) or "optional" (a flag
    whose value may be left out: then `const`). default: a value, or a function of nothing (read
    at parse time: Spaces, say); shown: the default as the docs say it, where a value would mislead."""

    flag: str
    env: Optional[str]
    help: str
    group: str
    default: Any = None
    convert: Callable[[str], Any] = str
    choices: Optional[tuple] = None
    kind: str = "value"
    metavar: Optional[str] = None
    const: Any = None
    shown: Optional[str] = None
    env_convert: Optional[Callable[[str], Any]] = None  # an environment value read another way than the flag's
    fallback_env: Optional[str] = None  # a second variable read when the first is unset (Gradio's own)
    empty_counts: bool = False  # an empty variable is a value (refused later), not "unset"

    @property
    def name(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        value = self.default_value()
        return "off" if value is False else "none" if value is None or value == () else f"`{value}`"


MODEL, ZEROGPU, REMOTE, SERVER, LIMITS = ("model", "ZeroGPU (Spaces that lend a GPU per answer)",
                                           "remote model (the page in front of an OpenAI-compatible server)",
                                           "server", "limits and fairness")

SETTINGS: tuple[Setting, ...] = (
    Setting("--model", "CHATGLM_MODEL", "checkpoint folder or Hugging Face id", MODEL, default=DEFAULT_MODEL),
    Setting("--quantize", "CHATGLM_QUANTIZE", "quantize the weights to 4 or 8 bits to save memory", MODEL,
            convert=int, choices=(4, 8), shown="off"),
    Setting("--adapter", "CHATGLM_ADAPTER", "a LoRA adapter in PEFT's format (folder or Hugging Face id), merged "
            "into the weights while they load, before --quantize", MODEL, metavar="DIR_OR_ID"),
    Setting("--ptuning-checkpoint", "CHATGLM_PTUNING_CHECKPOINT", "a P-tuning v2 checkpoint folder "
            "(pytorch_model.bin with transformer.prefix_encoder.*) loaded on top of --model", MODEL, metavar="DIR"),
    Setting("--pre-seq-len", "CHATGLM_PRE_SEQ_LEN", "the prefix length of --ptuning-checkpoint, which it must "
            "match", MODEL, convert=positive_int, metavar="N", shown="read from the checkpoint"),
    Setting("--lm-head", "CHATGLM_LM_HEAD", "the output layer's weights: auto is int8 whenever the blocks are "
            "quantized and a fused int8 kernel runs (CPU in bfloat16, CUDA): a decode step reads half the bytes "
            "there, logits within ~1%; float keeps it exact", MODEL, default="auto", choices=("auto", "int8", "float")),
    Setting("--build-kernels", "CHATGLM_BUILD_KERNELS", "build our C++ CPU kernels for this machine and torch "
            "(about 15 s with g++ and ninja), print which code path each takes, and exit: for an install or "
            "image-build step. Otherwise they build on the first start that runs a bfloat16 or quantized model on a "
            "CPU that has AVX2 or AVX-512, while the weights load", MODEL, default=False, kind="switch"),
    Setting("--device", "CHATGLM_DEVICE", "auto, cuda, cpu or mps (auto: CUDA, then MPS, then CPU)", MODEL,
            default="auto"),
    Setting("--dtype", "CHATGLM_DTYPE", "weights and activations; only float32 gives the same greedy answer "
            "alone and in a batch", MODEL, choices=("float16", "bfloat16", "float32"),
            shown="bfloat16 on CPUs and GPUs of compute capability 8.0+, float16 on older GPUs and MPS, "
                  "float32 for --tiny-random"),
    Setting("--tiny-random", "CHATGLM_TINY_RANDOM", "use a built-in tiny random model instead of --model: no "
            "download, answers are random text, for trying the page offline; FAMILY is one of the choices "
            "(the variable: 1 or a family)", MODEL, choices=TINY_FAMILIES, kind="optional", const="chatglm",
            metavar="FAMILY", env_convert=tiny_family),
    Setting("--no-cuda-graphs", "CHATGLM_NO_CUDA_GRAPHS", "on a CUDA GPU the engine runs each decode step over "
            "every slot with fixed shapes, compiled into CUDA graphs by torch.compile at start-up (before the page "
            "serves; torch's on-disk compile cache, on by default in TORCHINDUCTOR_CACHE_DIR, shortens later starts; "
            "if the compile fails the engine logs why and decodes eager); this flag keeps the eager step instead. "
            "CPUs and --zerogpu always run the eager step", MODEL, default=False, kind="switch"),
    Setting("--slots", "CHATGLM_SLOTS", "answers decoded together in one batch", MODEL, convert=positive_int,
            shown="CPUs: 16, sharing a quarter of the free memory as a token budget that each answer reserves its "
            "maximum length of when it starts; GPUs: as many whole contexts as fit a quarter of it, at most 16"),
    Setting("--context-length", "CHATGLM_CONTEXT_LENGTH", "tokens per conversation, prompt plus answer", MODEL,
            convert=positive_int, shown="the model's own, at most 8192 (--backend openai: 8192)"),
    Setting("--prefill-chunk", "CHATGLM_PREFILL_CHUNK", "prompt tokens read per engine step, beside the decode "
            "step of the answers already running (ChatGLM2/3, GLM-4: in the same forward), so a long prompt never "
            "stalls them (ChatGLM-6B: as much work, a few layers at a time); 0 reads each prompt whole at once",
            MODEL, convert=non_negative_int, metavar="TOKENS", shown="CPUs: at least 32, paced by measured step "
            "times (running answers wait about 6 of their usual gaps, a step takes about 1 s when none runs); "
            "GPUs: 512 (docs/chunked-prefill.md)"),
    Setting("--zerogpu", "CHATGLM_ZEROGPU", "run each answer as one spaces.GPU call on a model kept in CPU memory "
            "(no engine thread; /v1 chat answers 503); auto: on when the Space's hardware is ZeroGPU", ZEROGPU,
            default="auto", choices=("auto", "on", "off")),
    Setting("--gpu-duration", "CHATGLM_GPU_DURATION", "ZeroGPU: the longest GPU time one answer may reserve; each "
            "answer asks for what its maximum length needs at the measured speed, at most this", ZEROGPU,
            default=120, convert=positive_int, metavar="SECONDS"),
    Setting("--backend", "CHATGLM_BACKEND", "local: load the model in this process; openai: stream from "
            "--api-base instead (vLLM, llama.cpp server, another instance of this app)", REMOTE, default="local",
            choices=("local", "openai")),
    Setting("--api-base", "CHATGLM_API_BASE", "the remote server's OpenAI API root, e.g. http://gpu-box:8000/v1",
            REMOTE, metavar="URL"),
    Setting("--api-key", "CHATGLM_API_KEY", "key sent to the remote server", REMOTE),
    Setting("--remote-model", "CHATGLM_REMOTE_MODEL", "model name on the remote server", REMOTE, metavar="NAME",
            shown="the first it lists"),
    Setting("--host", "CHATGLM_HOST", "address to listen on; 0.0.0.0 for all interfaces", SERVER,
            default=lambda: "0.0.0.0" if running_on_spaces() else "127.0.0.1",
            shown="`127.0.0.1` (`0.0.0.0` on Spaces)", fallback_env="GRADIO_SERVER_NAME"),
    Setting("--port", "CHATGLM_PORT", "port to listen on", SERVER, default=7860, convert=port_number,
            fallback_env="GRADIO_SERVER_PORT"),
    Setting("--share", "CHATGLM_SHARE", "also create a public *.gradio.live link for 72 hours (ignored on Spaces)",
            SERVER, default=False, kind="switch"),
    Setting("--auth", "CHATGLM_AUTH", "every route but /health (the page, its API, /v1, /metrics) needs a login "
            "with this user name and password (or the API key); with --share or a host other than loopback, "
            "--require-api-key is needed too", SERVER, convert=auth_pair, metavar="USER:PASS"),
    Setting("--require-api-key", "CHATGLM_REQUIRE_API_KEY", "every route but /health needs this key as "
            "'Authorization: Bearer KEY' or a login session; the page's login form takes any user name with the "
            "key as password", SERVER, metavar="KEY", empty_counts=True),
    Setting("--cors-origin", "CHATGLM_CORS_ORIGINS", "let browser pages from ORIGIN (e.g. https://app.example.com) "
            "call /v1; repeatable (the variable: comma-separated); never '*', never with cookies", SERVER,
            default=(), kind="list", metavar="ORIGIN"),
    Setting("--allowed-hosts", "CHATGLM_ALLOWED_HOSTS", "comma-separated host names the server answers to (Host and "
            "X-Forwarded-Host); others get 400, which stops DNS rebinding. 'example.com' exactly, '.example.com' "
            "with its subdomains, '*' any; localhost names always work", SERVER, convert=comma_list,
            metavar="HOSTS", shown="the --host address (on 0.0.0.0 this machine's names and addresses), "
                                   "*.gradio.live with --share, the Space's host on Spaces"),
    Setting("--forwarded-allow-ips", "CHATGLM_FORWARDED_ALLOW_IPS", "comma-separated addresses of reverse proxies "
            "whose X-Forwarded-For names the client, for per-client limits; '*' trusts any peer", SERVER,
            convert=comma_list, metavar="IPS",
            shown="`*` on Spaces; the share tunnel's loopback peer with --share; none elsewhere"),
    Setting("--drain-seconds", "CHATGLM_DRAIN_SECONDS", "on SIGTERM, refuse new requests and let running answers "
            "finish for this long; the rest end with an error", SERVER, default=10.0, convert=non_negative_float,
            metavar="SECONDS"),
    Setting("--step-delay", "CHATGLM_STEP_DELAY", "sleep this long after every decode step; for tests and for "
            "watching Stop work", SERVER, default=0.0, convert=non_negative_float, metavar="SECONDS"),
    Setting("--header-timeout", "CHATGLM_HEADER_TIMEOUT", "a connection that has not sent a whole request head "
            "this long after it opened (or after its last answer) is closed", LIMITS,
            default=connections.HEADER_TIMEOUT_S, convert=positive_float, metavar="SECONDS"),
    Setting("--body-timeout", "CHATGLM_BODY_TIMEOUT", "a request body that stops arriving this long ends its "
            "connection; answers, however long, have no such limit", LIMITS, default=connections.BODY_TIMEOUT_S,
            convert=positive_float, metavar="SECONDS"),
    Setting("--keep-alive", "CHATGLM_KEEP_ALIVE", "an idle connection is closed after this long", LIMITS,
            default=connections.KEEP_ALIVE_S, convert=positive_float, metavar="SECONDS"),
    Setting("--max-connections", "CHATGLM_MAX_CONNECTIONS", "open connections in all; never more than the open-file "
            "limit leaves room for", LIMITS, convert=positive_int, metavar="N",
            shown=f"that room, at most {connections.MAX_TOTAL}"),
    Setting("--max-connections-per-client", "CHATGLM_MAX_CONNECTIONS_PER_CLIENT", "open connections from one address "
            "(IPv6: one /64); 0 for none, behind a proxy where every connection comes from the proxy", LIMITS,
            convert=non_negative_int, metavar="N",
            shown=f"`{connections.MAX_PER_CLIENT}` (`0` on Spaces and with --share, whose visitors all arrive "
                  "through one proxy)"),
    Setting("--max-per-client", "CHATGLM_MAX_PER_CLIENT", "answers one client (address) may have running or waiting "
            "at once, page and /v1 together; more are refused with 429", LIMITS, default=DEFAULT_PER_CLIENT,
            convert=positive_int, metavar="N"),
    Setting("--max-body-bytes", "CHATGLM_MAX_BODY_BYTES", "largest request body on any route; larger ones get 413",
            LIMITS, default=limits.MAX_BODY_BYTES, convert=positive_int),
    Setting("--request-timeout", "CHATGLM_REQUEST_TIMEOUT", "an answer (waiting in the queue included) ends with an "
            "error after this long", LIMITS, default=limits.DEFAULT_REQUEST_TIMEOUT_S, convert=non_negative_float,
            metavar="SECONDS"),
    Setting("--queue-size", "CHATGLM_QUEUE_SIZE", "requests that may wait, in the page's queue and in the model's "
            "for /v1; more are refused as busy (429)", LIMITS, convert=positive_int,
            shown=f"`{QUEUE_SIZE[False]}` (`{QUEUE_SIZE[True]}` on ZeroGPU)"),
    Setting("--concurrency", "CHATGLM_CONCURRENCY", "answers streaming at once; the model batches them, the rest "
            "wait in the queue", LIMITS, convert=positive_int,
            shown=f"`{CONCURRENCY[False]}` (`{CONCURRENCY[True]}` on ZeroGPU, where each holds a GPU of its own)"),
)


def build_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The command line of SETTINGS. Every default is SUPPRESS: `parse` tells what the command
    line gave from what it did not, and fills the rest from the environment and the defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    groups: dict[str, Any] = {}
    for setting in SETTINGS:
        group = groups.get(setting.group) or groups.setdefault(setting.group, parser.add_argument_group(setting.group))
        env = f"env {setting.env}" + (f" or {setting.fallback_env}" if setting.fallback_env else "")
        text = f"{setting.help} ({env}; default: {setting.shown_default().replace('`', '')})".replace("%", "%%")
        if setting.kind == "switch":
            group.add_argument(setting.flag, action="store_true", help=text)
        elif setting.kind == "list":
            group.add_argument(setting.flag, action="append", metavar=setting.metavar, help=text)
        else:
            group.add_argument(setting.flag, type=setting.convert, choices=setting.choices, metavar=setting.metavar,
                               help=text, **({"nargs": "?", "const": setting.const} if setting.kind == "optional"
                                              else {}))
    return parser


def from_environment(setting: Setting, environ: Mapping[str, str]) -> Any:
    """The setting's value from its variable (or its fallback), the default if neither is set;
    ArgumentTypeError naming the variable if the value is bad."""
    name = setting.env if environ.get(setting.env) not in (None, "") or setting.empty_counts \
        else setting.fallback_env
    value = environ.get(name) if name else None
    if value is None or (value == "" and not setting.empty_counts):
        return setting.default_value()
    try:
        if setting.kind == "switch":
            return switch(value)
        if setting.kind == "list":
            return comma_list(value)
        converted = (setting.env_convert or setting.convert)(value)
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{name}: {error}") from None
    if converted is not None and setting.choices is not None and converted not in setting.choices:
        raise argparse.ArgumentTypeError(f"{name}: expected one of {', '.join(map(str, setting.choices))}, "
                                         f"got {value!r}")
    return converted


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
          environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """The settings: the command line, then the environment, then the defaults."""
    args = parser.parse_args(argv)
    for setting in SETTINGS:
        if hasattr(args, setting.name):
            if setting.kind == "list":
                setattr(args, setting.name, tuple(getattr(args, setting.name)))
            continue
        try:
            setattr(args, setting.name, from_environment(setting, environ))
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    return args


def markdown_table() -> str:
    """The settings as the table in docs/configuration.md."""
    rows = ["| flag | environment variable | default | what it does |", "|---|---|---|---|"]
    for setting in SETTINGS:
        flag = setting.flag if setting.kind == "switch" else \
            f"{setting.flag} {'{' + ','.join(map(str, setting.choices)) + '}' if setting.choices else setting.metavar or 'VALUE'}"
        env = f"`{setting.env}`" + (f" (or `{setting.fallback_env}`)" if setting.fallback_env else "")
        rows.append(f"| `{flag}` | {env} | {setting.shown_default()} | {setting.help} |")
    return "\n".join(rows)
