"""ChatGLM-6B web demo: `python app.py`, then open http://127.0.0.1:7860.

Every flag can also be set by an environment variable (shown in --help), which is how a Hugging
Face Space passes its settings: set them as Space variables. On Spaces the page binds to
0.0.0.0:7860 by itself. Try the page without downloading the model: `python app.py --tiny-random`.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time

from webdemo import connections, limits, settings
from webdemo.access import AccessPolicy
from webdemo.fair_share import FairShareBackend
from webdemo.hf_spaces import ZEROGPU_API_MESSAGE, running_on_spaces, zero_gpu, zerogpu_call

LOOPBACK_PEERS = ("127.0.0.1", "::1")  # where Gradio's share tunnel (frpc) connects from
EPILOG = "Exit status: 0 after a normal shutdown, 1 when the model cannot be loaded, 2 for bad flags."


def parse_args(argv=None) -> argparse.Namespace:
    """The settings (webdemo/settings.py: flag, else environment variable, else default), then
    the checks that involve more than one of them."""
    parser = settings.build_parser("python app.py", __doc__, EPILOG)
    args = settings.parse(parser, argv)
    if args.zerogpu == "on" and args.backend == "openai":
        parser.error("--zerogpu on runs the model here; --backend openai uses a remote one: choose one")
    args.zerogpu = args.zerogpu == "on" or (args.zerogpu == "auto" and args.backend == "local" and zero_gpu())
    if args.concurrency is None:
        args.concurrency = settings.CONCURRENCY[args.zerogpu]
    if args.queue_size is None:
        args.queue_size = settings.QUEUE_SIZE[args.zerogpu]
    if args.forwarded_allow_ips is None:  # whose X-Forwarded-For names the client: Spaces' proxy, the share tunnel
        args.forwarded_allow_ips = ("*",) if running_on_spaces() else LOOPBACK_PEERS if args.share else ()
    if args.max_connections_per_client is None:  # behind Spaces' proxy or the share tunnel every peer is the proxy
        args.max_connections_per_client = 0 if running_on_spaces() or args.share else connections.MAX_PER_CLIENT
    if args.pre_seq_len is not None and not args.ptuning_checkpoint:
        parser.error("--pre-seq-len (CHATGLM_PRE_SEQ_LEN) is the prefix length of a P-tuning checkpoint: "
                     "give --ptuning-checkpoint DIR too")
    if args.backend == "openai" and not args.api_base:
        parser.error("--backend openai needs --api-base URL (the remote server's /v1 root)")
    problem = access_policy(args).startup_problem(args.host, args.share and not running_on_spaces())
    if problem:
        parser.error(problem)
    return args


def access_policy(args: argparse.Namespace) -> AccessPolicy:
    return AccessPolicy(login=args.auth, api_key=args.require_api_key, cors_origins=args.cors_origin,
                        allowed_hosts=args.allowed_hosts, trusted_proxies=args.forwarded_allow_ips)


def server_limits(args: argparse.Namespace) -> limits.Limits:
    return limits.Limits(max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout)


def connection_limits(args: argparse.Namespace) -> connections.ConnectionLimits:
    return connections.ConnectionLimits(
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive,
        max_per_client=args.max_connections_per_client, max_total=args.max_connections)


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
        return start_engine(args.model, slots=args.slots, max_queue=args.queue_size,
                            cuda_graphs=False if args.no_cuda_graphs else None, prefill_chunk=args.prefill_chunk,
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
    if args.build_kernels:
        from model_runtime.native.__main__ import main as build_kernels  # brings torch: only for this step

        return build_kernels()
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
    # Start-up's objects (about 390,000 with the tiny model and the page) live as long as the
    # process; a full collection walking them held the GIL, so every stream, for about 0.2 s (EPYC
    # Zen 5): from here collections leave them out (start-up's garbage goes first, not frozen in).
    gc.collect()
    gc.freeze()
    server = start_server(page, backend, policy=access_policy(args), limits=request_limits,
                          connection_limits=connection_limits(args),
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
