"""ChatGLM-6B web demo: `python app.py`, then open http://127.0.0.1:7860.

Every flag can also be set by an environment variable (shown in --help), which is how a Hugging
Face Space passes its settings: set them as Space variables. On Spaces the page binds to
0.0.0.0:7860 by itself. Try the page without downloading the model: `python app.py --tiny-random`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Optional

from webdemo import limits
from webdemo.access import AccessPolicy
from webdemo.fair_share import DEFAULT_PER_CLIENT, FairShareBackend
from webdemo.hf_spaces import ZEROGPU_API_MESSAGE, running_on_spaces, zero_gpu, zerogpu_call

DEFAULT_MODEL = "THUDM/chatglm-6b"
TRUE = ("1", "true", "yes", "on")
TINY_FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4", "glm4-0414", "z1", "glm4-hf")
CONCURRENCY = {False: 64, True: 4}  # by ZeroGPU mode
QUEUE_SIZE = {False: 100, True: 32}


def env(name: str, default=None):
    value = os.environ.get(name)
    return default if value in (None, "") else value


def env_flag(name: str) -> bool:
    return str(env(name, "")).lower() in TRUE


def tiny_family(value):
    """CHATGLM_TINY_RANDOM: 1/true means ChatGLM-6B, a family name that family, else off."""
    if value is None or value.lower() in ("0", "false", "no", "off"):
        return None
    return "chatglm" if value.lower() in TRUE else value


def auth_pair(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return user, password


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return number


def parse_args(argv=None) -> argparse.Namespace:
    default_host = env("CHATGLM_HOST", env("GRADIO_SERVER_NAME", "0.0.0.0" if running_on_spaces() else "127.0.0.1"))
    parser = argparse.ArgumentParser(
        prog="python app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 after a normal shutdown, 1 when the model cannot be loaded, 2 for bad flags.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=env("CHATGLM_MODEL", DEFAULT_MODEL),
                       help="checkpoint folder or Hugging Face id (env CHATGLM_MODEL; default %(default)s)")
    model.add_argument("--quantize", type=int, choices=(4, 8), default=env("CHATGLM_QUANTIZE"),
                       help="quantize the weights to 4 or 8 bits to save memory (env CHATGLM_QUANTIZE; default: off)")
    model.add_argument("--adapter", default=env("CHATGLM_ADAPTER"), metavar="DIR_OR_ID",
                       help="a LoRA adapter in PEFT's format (folder or Hugging Face id), merged into the weights "
                            "while they load, before --quantize (env CHATGLM_ADAPTER)")
    model.add_argument("--ptuning-checkpoint", default=env("CHATGLM_PTUNING_CHECKPOINT"), metavar="DIR",
                       help="a P-tuning v2 checkpoint folder (pytorch_model.bin with transformer.prefix_encoder.*)"
                            " loaded on top of --model (env CHATGLM_PTUNING_CHECKPOINT)")
    model.add_argument("--pre-seq-len", type=positive_int, default=env("CHATGLM_PRE_SEQ_LEN"), metavar="N",
                       help="the prefix length of --ptuning-checkpoint (env CHATGLM_PRE_SEQ_LEN; default: read from "
                            "the checkpoint, which it must match)")
    model.add_argument("--lm-head", choices=("auto", "int8", "float"), default=env("CHATGLM_LM_HEAD", "auto"),
                       help="the output layer's weights: auto is int8 whenever the blocks are quantized and a fused "
                            "int8 kernel runs (CPU in bfloat16, CUDA): a decode step reads half the bytes there, "
                            "logits within ~1%%; float keeps it exact (env CHATGLM_LM_HEAD; default %(default)s)")
    model.add_argument("--device", default=env("CHATGLM_DEVICE", "auto"),
                       help="auto, cuda, cpu or mps (env CHATGLM_DEVICE; default %(default)s: CUDA, then MPS, then CPU)")
    model.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=env("CHATGLM_DTYPE"),
                       help="weights and activations (env CHATGLM_DTYPE; default: bfloat16 on CPUs and on GPUs of "
                            "compute capability 8.0 or later, float16 on older GPUs and MPS, float32 for --tiny-random); only float32 gives the same greedy answer alone "
                            "and in a batch")
    model.add_argument("--tiny-random", nargs="?", const="chatglm", default=tiny_family(env("CHATGLM_TINY_RANDOM")),
                       choices=TINY_FAMILIES, metavar="FAMILY",
                       help="use a built-in tiny random model instead of --model: no download, answers are random "
                            "text, for trying the page offline; FAMILY is one of %(choices)s (default chatglm, "
                            "i.e. ChatGLM-6B) (env CHATGLM_TINY_RANDOM=1 or a family)")
    model.add_argument("--cuda-graphs", action="store_true", default=env_flag("CHATGLM_CUDA_GRAPHS"),
                       help="on a CUDA GPU: run each decode step over every slot with fixed shapes, compiled into "
                            "CUDA graphs by torch.compile (slower start-up while it compiles) (env "
                            "CHATGLM_CUDA_GRAPHS=1; default off)")
    model.add_argument("--slots", type=positive_int, default=env("CHATGLM_SLOTS"),
                       help="answers decoded together in one batch (env CHATGLM_SLOTS; default: as many as "
                            "fit in memory, at most 16)")
    model.add_argument("--context-length", type=positive_int, default=env("CHATGLM_CONTEXT_LENGTH"),
                       help="tokens per conversation, prompt plus answer (env CHATGLM_CONTEXT_LENGTH; default: the "
                            "model's own, at most 8192; with --backend openai the remote model's, default 8192)")
    hosting = parser.add_argument_group("ZeroGPU (Hugging Face Spaces that lend a GPU per answer)")
    hosting.add_argument("--zerogpu", choices=("auto", "on", "off"), default=env("CHATGLM_ZEROGPU", "auto"),
                         help="run each answer as one spaces.GPU call on a model kept in CPU memory (no engine "
                              "thread; /v1 chat answers 503); auto: on when the Space's hardware is ZeroGPU "
                              "(SPACES_ZERO_GPU) (env CHATGLM_ZEROGPU; default %(default)s)")
    hosting.add_argument("--gpu-duration", type=positive_int, default=int(env("CHATGLM_GPU_DURATION", 120)),
                         metavar="SECONDS",
                         help="ZeroGPU: the longest GPU time one answer may reserve; each answer asks for what its "
                              "maximum length needs at the measured speed, at most this (env CHATGLM_GPU_DURATION; "
                              "default %(default)s)")
    remote = parser.add_argument_group("remote model (the page in front of an OpenAI-compatible server)")
    remote.add_argument("--backend", choices=("local", "openai"), default=env("CHATGLM_BACKEND", "local"),
                        help="local: load the model in this process; openai: stream from --api-base instead "
                             "(vLLM, llama.cpp server, another instance of this app) (env CHATGLM_BACKEND; "
                             "default %(default)s)")
    remote.add_argument("--api-base", default=env("CHATGLM_API_BASE"), metavar="URL",
                        help="the remote server's OpenAI API root, e.g. http://gpu-box:8000/v1 (env CHATGLM_API_BASE)")
    remote.add_argument("--api-key", default=env("CHATGLM_API_KEY"),
                        help="key sent to the remote server (env CHATGLM_API_KEY)")
    remote.add_argument("--remote-model", default=env("CHATGLM_REMOTE_MODEL"), metavar="NAME",
                        help="model name on the remote server (env CHATGLM_REMOTE_MODEL; default: the first it lists)")
    server = parser.add_argument_group("server")
    server.add_argument("--require-api-key", default=os.environ.get("CHATGLM_REQUIRE_API_KEY"), metavar="KEY",
                        help="every route but /health (the page, its API, /v1, /metrics) needs this key as "
                             "'Authorization: Bearer KEY' or a login session; the page's login form takes any "
                             "user name with the key as password (env CHATGLM_REQUIRE_API_KEY; default: no key)")
    server.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        default=[o.strip() for o in str(env("CHATGLM_CORS_ORIGINS", "")).split(",") if o.strip()],
                        help="let browser pages from ORIGIN (e.g. https://app.example.com) call /v1; repeatable "
                             "(env CHATGLM_CORS_ORIGINS, comma-separated; default: none)")
    server.add_argument("--allowed-hosts", metavar="HOSTS", default=env("CHATGLM_ALLOWED_HOSTS"),
                        help="comma-separated host names the server answers to (Host and X-Forwarded-Host); others "
                             "get 400, which stops DNS rebinding. 'example.com' exactly, '.example.com' with its "
                             "subdomains, '*' any. localhost names always work (env CHATGLM_ALLOWED_HOSTS; default: "
                             "the --host address, on 0.0.0.0 this machine's names and addresses, *.gradio.live with "
                             "--share, the Space's host on Hugging Face Spaces)")
    server.add_argument("--forwarded-allow-ips", metavar="IPS", default=env("CHATGLM_FORWARDED_ALLOW_IPS"),
                        help="comma-separated addresses of reverse proxies whose X-Forwarded-For names the client, "
                             "for per-client limits; '*' trusts any peer (env CHATGLM_FORWARDED_ALLOW_IPS; default: "
                             "'*' on Hugging Face Spaces, none elsewhere)")
    server.add_argument("--max-per-client", type=positive_int, metavar="N",
                        default=env("CHATGLM_MAX_PER_CLIENT", DEFAULT_PER_CLIENT),
                        help="answers one client (address) may have running or waiting at once, page and /v1 "
                             "together; more are refused with 429 (env CHATGLM_MAX_PER_CLIENT; default %(default)s)")
    server.add_argument("--max-body-bytes", type=positive_int,
                        default=int(env("CHATGLM_MAX_BODY_BYTES", limits.MAX_BODY_BYTES)),
                        help="largest request body on any route; larger ones get 413 "
                             "(env CHATGLM_MAX_BODY_BYTES; default %(default)s)")
    server.add_argument("--request-timeout", type=non_negative_float, metavar="SECONDS",
                        default=float(env("CHATGLM_REQUEST_TIMEOUT", limits.DEFAULT_REQUEST_TIMEOUT_S)),
                        help="an answer (waiting in the queue included) ends with an error after this long "
                             "(env CHATGLM_REQUEST_TIMEOUT; default %(default)s)")
    server.add_argument("--drain-seconds", type=non_negative_float, metavar="SECONDS",
                        default=float(env("CHATGLM_DRAIN_SECONDS", 10)),
                        help="on SIGTERM, refuse new requests and let running answers finish for this long; the "
                             "rest end with an error (env CHATGLM_DRAIN_SECONDS; default %(default)s)")
    server.add_argument("--host", default=default_host,
                        help="address to listen on; 0.0.0.0 for all interfaces (env CHATGLM_HOST; "
                             "default %(default)s; 0.0.0.0 on Hugging Face Spaces)")
    server.add_argument("--port", type=int, default=int(env("CHATGLM_PORT", env("GRADIO_SERVER_PORT", 7860))),
                        help="port to listen on (env CHATGLM_PORT; default %(default)s)")
    server.add_argument("--share", action="store_true", default=env_flag("CHATGLM_SHARE"),
                        help="also create a public *.gradio.live link for 72 hours (env CHATGLM_SHARE=1; "
                             "ignored on Spaces)")
    server.add_argument("--auth", type=auth_pair, default=None, metavar="USER:PASS",
                        help="every route but /health (the page, its API, /v1, /metrics) needs a login with this "
                             "user name and password (or the API key); with --share or a host other than "
                             "loopback, --require-api-key is needed too (env CHATGLM_AUTH)")
    server.add_argument("--queue-size", type=positive_int, default=env("CHATGLM_QUEUE_SIZE"),
                        help="requests that may wait, in the page's queue and in the model's for /v1; more are "
                             f"refused as busy (429) (env CHATGLM_QUEUE_SIZE; default {QUEUE_SIZE[False]}, "
                             f"{QUEUE_SIZE[True]} on ZeroGPU)")
    server.add_argument("--concurrency", type=positive_int, default=env("CHATGLM_CONCURRENCY"),
                        help="answers streaming at once; the model batches them, the rest wait in the queue "
                             f"(env CHATGLM_CONCURRENCY; default {CONCURRENCY[False]}; {CONCURRENCY[True]} on "
                             "ZeroGPU, where each one holds a GPU of its own)")
    server.add_argument("--step-delay", type=float, default=float(env("CHATGLM_STEP_DELAY", 0)), metavar="SECONDS",
                        help="sleep this long after every decode step; for tests and for watching Stop work "
                             "(env CHATGLM_STEP_DELAY; default 0)")
    args = parser.parse_args(argv)
    if args.auth is None and env("CHATGLM_AUTH"):
        try:
            args.auth = auth_pair(env("CHATGLM_AUTH"))
        except argparse.ArgumentTypeError:
            parser.error("CHATGLM_AUTH: expected USER:PASS")
    if args.quantize is not None:
        try:
            args.quantize = int(args.quantize)
        except ValueError:
            parser.error(f"CHATGLM_QUANTIZE: expected 4 or 8, got {args.quantize!r}")
        if args.quantize not in (4, 8):
            parser.error(f"CHATGLM_QUANTIZE: expected 4 or 8, got {args.quantize!r}")
    if args.lm_head not in ("auto", "int8", "float"):
        parser.error(f"CHATGLM_LM_HEAD: expected auto, int8 or float, got {args.lm_head!r}")
    if args.tiny_random not in (None, *TINY_FAMILIES):
        parser.error(f"CHATGLM_TINY_RANDOM: expected 1 or one of {', '.join(TINY_FAMILIES)}, got {args.tiny_random!r}")
    if args.cuda_graphs and args.zerogpu == "on":
        parser.error("--cuda-graphs is for the engine; --zerogpu on runs one answer per GPU call without it")
    if args.zerogpu == "on" and args.backend == "openai":
        parser.error("--zerogpu on runs the model here; --backend openai uses a remote one: choose one")
    args.zerogpu = args.zerogpu == "on" or (args.zerogpu == "auto" and args.backend == "local" and zero_gpu())
    for name, defaults in (("concurrency", CONCURRENCY), ("queue_size", QUEUE_SIZE)):
        value = getattr(args, name)
        value = defaults[args.zerogpu] if value is None else value
        try:
            setattr(args, name, positive_int(str(value)))
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"CHATGLM_{name.upper()}: expected a whole number >= 1, got {value!r}")
    if args.slots is not None:
        args.slots = int(args.slots)
    if args.context_length is not None:
        args.context_length = int(args.context_length)
    if args.pre_seq_len is not None and not args.ptuning_checkpoint:
        parser.error("--pre-seq-len (CHATGLM_PRE_SEQ_LEN) is the prefix length of a P-tuning checkpoint: "
                     "give --ptuning-checkpoint DIR too")
    if args.backend == "openai" and not args.api_base:
        parser.error("--backend openai needs --api-base URL (the remote server's /v1 root)")
    try:
        args.max_per_client = positive_int(str(args.max_per_client))
    except (ValueError, argparse.ArgumentTypeError):
        parser.error(f"CHATGLM_MAX_PER_CLIENT: expected a whole number >= 1, got {args.max_per_client!r}")
    if args.step_delay < 0:
        parser.error("--step-delay must be >= 0")
    problem = access_policy(args).startup_problem(args.host, args.share and not running_on_spaces())
    if problem:
        parser.error(problem)
    return args


def comma_list(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if value is None else tuple(part.strip() for part in value.split(",") if part.strip())


def access_policy(args: argparse.Namespace) -> AccessPolicy:
    trusted = comma_list(args.forwarded_allow_ips)
    return AccessPolicy(login=args.auth, api_key=args.require_api_key, cors_origins=tuple(args.cors_origin),
                        allowed_hosts=comma_list(args.allowed_hosts),
                        trusted_proxies=trusted if trusted is not None else ("*",) if running_on_spaces() else ())


def server_limits(args: argparse.Namespace) -> limits.Limits:
    return limits.Limits(max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout)


def load_backend(args: argparse.Namespace):
    """The local engine on the chosen checkpoint, or the remote server's client; SystemExit(1)
    with one clear message if it fails."""
    if args.backend == "openai":
        from webdemo.remote import OpenAIBackend

        try:
            return OpenAIBackend(args.api_base, api_key=args.api_key, model=args.remote_model,
                                 context_length=args.context_length or 8192)
        except ConnectionError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1)
    gpu_call = host_gpu_call() if args.zerogpu else None  # before torch is set up
    # Imported here, not at the top: the runtime brings torch, which --backend openai never needs.
    from model_runtime.models.config import CheckpointError
    from model_runtime.serving.launch import start_engine, start_per_call

    options = dict(device=args.device, dtype=args.dtype, tiny_random=args.tiny_random or False,
                   step_delay=args.step_delay, context_length=args.context_length, adapter=args.adapter,
                   ptuning_checkpoint=args.ptuning_checkpoint, pre_seq_len=args.pre_seq_len, lm_head=args.lm_head,
                   quantize=args.quantize)
    try:
        if gpu_call is not None:
            return start_per_call(args.model, gpu_call=gpu_call, max_gpu_s=args.gpu_duration,
                                  max_active=args.concurrency, **options)
        return start_engine(args.model, slots=args.slots, max_queue=args.queue_size, cuda_graphs=args.cuda_graphs,
                            **options)
    except (CheckpointError, OSError, ValueError) as error:
        fail(args, str(error))
    except Exception as error:  # out of memory, a broken install...: advice, not a traceback
        fail(args, f"{type(error).__name__}: {error}")


def host_gpu_call():
    """ZeroGPU's `spaces.GPU`, imported before the model loads (it must patch torch first)."""
    try:
        return zerogpu_call()
    except ImportError as error:
        print(f"error: ZeroGPU mode needs the `spaces` package ({error}): pip install spaces, or run with "
              "--zerogpu off", file=sys.stderr)
        raise SystemExit(1)


def fail(args: argparse.Namespace, reason: str) -> None:
    what = "the built-in tiny random model" if args.tiny_random else f"the model {args.model!r}"
    print(f"error: could not load {what}: {reason}\n"
          "What to do: pass --model a folder with config.json, tokenizer files and weights, or a Hugging Face "
          "id such as THUDM/chatglm-6b (the first run downloads about 13 GB, so the network must work); "
          "if memory is short, try --quantize 4 or 8, or --device cpu; to try the page without the model, "
          "run: python app.py --tiny-random", file=sys.stderr)
    raise SystemExit(1)


class StopRequests:
    """SIGTERM (`docker stop`, Spaces) and Ctrl+C only note that a stop was asked for; the main
    thread then shuts down in order. Nothing is raised into whatever code the signal interrupts."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def wait(self) -> None:
        while self.signal is None:
            time.sleep(0.1)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Ctrl+C or SIGTERM here simply end the process: nothing to drain yet
    backend = FairShareBackend(load_backend(args), per_client=args.max_per_client)
    stop = StopRequests()
    from webdemo.server import start_server
    from webdemo.ui import build_page

    if backend.info.random_weights:
        print("note: serving a tiny random model; its answers are random text", file=sys.stderr)
    request_limits = server_limits(args)
    page = build_page(backend, concurrency_limit=args.concurrency, limits=request_limits,  # storage key: storage_key.py
                      auto_titles=not backend.info.random_weights)  # a random model's titles would be noise
    server = start_server(page, backend, policy=access_policy(args), limits=request_limits,
                          concurrency=args.concurrency, queue_size=args.queue_size, host=args.host, port=args.port,
                          share=args.share and not running_on_spaces(),
                          chat_api_unavailable=ZEROGPU_API_MESSAGE if args.zerogpu else None)
    try:
        stop.wait()
        print(f"stopping: new requests get 503; answers running get up to {args.drain_seconds:g} s to finish",
              file=sys.stderr)
    finally:
        server.shutdown(drain_s=args.drain_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
