"""`gpuhost run / ps / list / usage / generate`: the client side, talking HTTP to a server
named by GPUHOST_HOST with the key in GPUHOST_API_KEY (`ollama run`'s experience)."""

import base64
import json
import shlex
import sys
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console

from cli.settings import ClientSettings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
NS = 1e9
err = Console(stderr=True, soft_wrap=True)


class ClientError(Exception):
    """Something to tell the person at the terminal; the command exits 1."""


class Client:
    def __init__(self, settings: ClientSettings | None = None):
        self.settings = settings or ClientSettings()
        headers = {}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        self.http = httpx.Client(
            base_url=self.settings.base_url(),
            headers=headers,
            timeout=httpx.Timeout(self.settings.timeout_seconds, connect=10),
        )

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        response.read()
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text or response.reason_phrase
        if isinstance(message, dict):
            message = message.get("message", str(message))
        if response.status_code == 401:
            message += " (set GPUHOST_API_KEY to a valid key)"
        elif response.status_code == 429:
            retry = response.headers.get("retry-after")
            message += f" (retry after {retry}s)" if retry else ""
        raise ClientError(message)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self._check(self.http.request(method, path, **kwargs))
        except httpx.ConnectError:
            raise ClientError(
                f"could not connect to gpuhost at {self.settings.base_url()} "
                "(is it running? set GPUHOST_HOST)"
            ) from None
        except httpx.TimeoutException:
            raise ClientError("the server did not answer in time") from None

    def stream_chat(self, body: dict):
        """Yield the NDJSON chunks of a streamed /api/chat."""
        try:
            with self.http.stream("POST", "/api/chat", json=body) as response:
                self._check(response)
                for line in response.iter_lines():
                    if line.strip():
                        chunk = json.loads(line)
                        if "error" in chunk:
                            raise ClientError(chunk["error"])
                        yield chunk
        except httpx.ConnectError:
            raise ClientError(
                f"could not connect to gpuhost at {self.settings.base_url()} "
                "(is it running? set GPUHOST_HOST)"
            ) from None
        except httpx.TimeoutException:
            raise ClientError("the server stopped answering") from None


def _image(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ClientError(f"no such image file: {path}")
    return base64.b64encode(file.read_bytes()).decode()


def _images_in(prompt: str) -> tuple[str, list[str]]:
    """Image file paths typed into a prompt are attached (as `ollama run` does)."""
    try:
        words = shlex.split(prompt)
    except ValueError:
        words = prompt.split()
    images = []
    for word in words:
        candidate = Path(word).expanduser()
        if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
            images.append(_image(word))
            prompt = prompt.replace(word, "").strip()
    return prompt, images


def _stats(final: dict) -> str:
    def duration(ns: int) -> str:
        seconds = ns / NS
        return f"{seconds * 1000:.2f}ms" if seconds < 1 else f"{seconds:.3f}s"

    def rate(count: int, ns: int) -> str:
        return f"{count / (ns / NS):.2f} tokens/s" if ns else "-"

    return "\n".join(
        [
            f"total duration:       {duration(final['total_duration'])}",
            f"load duration:        {duration(final['load_duration'])}",
            f"prompt eval count:    {final['prompt_eval_count']} token(s)",
            f"prompt eval duration: {duration(final['prompt_eval_duration'])}",
            f"prompt eval rate:     "
            f"{rate(final['prompt_eval_count'], final['prompt_eval_duration'])}",
            f"eval count:           {final['eval_count']} token(s)",
            f"eval duration:        {duration(final['eval_duration'])}",
            f"eval rate:            {rate(final['eval_count'], final['eval_duration'])}",
            f"gpu seconds:          {final['gpu_seconds']:.3f}",
        ]
    )


def _answer(
    client: Client, model: str, messages: list[dict], verbose: bool, options: dict | None = None
) -> str:
    """Stream one answer to stdout; returns its text."""
    parts: list[str] = []
    waiting = err.status("thinking...", spinner="dots") if err.is_terminal else None
    if waiting:
        waiting.start()
    try:
        body = {"model": model, "messages": messages, "options": options or {}}
        for chunk in client.stream_chat(body):
            if waiting:
                waiting.stop()
                waiting = None
            if chunk.get("done"):
                print(flush=True)
                if verbose:
                    print(_stats(chunk), file=sys.stderr, flush=True)
                break
            text = chunk["message"]["content"]
            parts.append(text)
            print(text, end="", flush=True)
    finally:
        if waiting:
            waiting.stop()
    return "".join(parts)


def run(model: str, prompt: str | None, image: list[Path] | None, verbose: bool) -> None:
    client = Client()
    if prompt is not None:
        text, found = _images_in(prompt)
        message = {
            "role": "user",
            "content": text,
            "images": [_image(str(p)) for p in image or []] + found,
        }
        _answer(client, model, [message], verbose)
        return
    _chat(client, model, [_image(str(p)) for p in image or []], verbose)


HELP = """/image FILE                 attach a picture to your next message
/set parameter NAME VALUE   e.g. num_predict 100, temperature 0.2, seed 42, top_p 0.9
/? or /help                 this list
/bye                        quit"""


def _parameter(line: str, options: dict) -> str:
    words = line.split()
    if len(words) != 4 or words[1] != "parameter":
        return "usage: /set parameter NAME VALUE"
    name, raw = words[2], words[3]
    try:
        value: int | float = int(raw)
    except ValueError:
        try:
            value = float(raw)
        except ValueError:
            return f"{name}: {raw!r} is not a number"
    options[name] = value
    return f"Set parameter '{name}' to '{raw}'"


def _chat(client: Client, model: str, pending: list[str], verbose: bool) -> None:
    """Interactive, multi-turn: `/image FILE` attaches a picture, `/bye` (or Ctrl-D) ends."""
    history: list[dict] = []
    options: dict = {}
    interactive = sys.stdin.isatty()
    if interactive:
        err.print("Send a message (/image FILE to attach a picture, /? for help, /bye to quit)")
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/bye", "/exit"):
            break
        if line in ("/?", "/help"):
            print(HELP, flush=True)
            continue
        if line.startswith("/set"):
            print(_parameter(line, options), flush=True)
            continue
        if line.startswith("/image"):
            try:
                pending.append(_image(line.removeprefix("/image").strip()))
                print(f"Added image ({len(pending)} pending)", flush=True)
            except ClientError as exc:
                print(f"Error: {exc}", flush=True)
            continue
        command = line.split()[0]
        if command.startswith("/") and not Path(command).is_file():  # a path is a picture
            print(f"Unknown command '{command}'. The commands are:\n{HELP}", flush=True)
            continue
        text, found = _images_in(line)
        history.append({"role": "user", "content": text, "images": pending + found})
        pending = []
        try:
            answer = _answer(client, model, history, verbose, options)
        except KeyboardInterrupt:
            print("\n(cancelled)", flush=True)
            history.pop()
            continue
        except ClientError as exc:
            print(f"Error: {exc}", flush=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "    ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def ps() -> None:
    models = Client().request("GET", "/api/ps").json()["models"]
    rows = [
        [
            m["name"],
            _size(m["size"]),
            "GPU" if m["size_vram"] else "CPU",
            m["expires_at"] or "Forever",
            str(m["workers"]),
            str(m["active"]),
        ]
        for m in models
    ]
    print(_table(rows, ["NAME", "SIZE", "PROCESSOR", "UNTIL", "WORKERS", "ACTIVE"]))


def list_models() -> None:
    models = Client().request("GET", "/api/tags").json()["models"]
    rows = [[m["name"], m["details"].get("parameter_size", ""), _size(m["size"])] for m in models]
    print(_table(rows, ["NAME", "PARAMETERS", "SIZE"]))


def usage(limit: int) -> None:
    client = Client()
    found = client.request("GET", "/api/usage/requests", params={"limit": limit}).json()
    rows = [
        [
            r["finished_at"][:19].replace("T", " "),
            r["request_id"][:12],
            r["model"],
            r["kind"],
            r["status"],
            f"{r['prompt_tokens']:,}",
            f"{r['output_tokens']:,}",
            f"{r['gpu_seconds']:,.3f}",
        ]
        for r in found["requests"]
    ]
    head = ["FINISHED", "REQUEST", "MODEL", "KIND", "STATUS", "PROMPT", "OUTPUT", "GPU-S"]
    print(_table(rows, head))
    print(f"\n{len(rows)} request(s), {found['gpu_seconds']:,.3f} GPU-seconds")
    period = client.request("GET", "/api/balance").json()
    print(
        f"this period ({period['plan']}, to {period['period_end'][:10]}): "
        f"{period['used_gpu_seconds']:,.3f} of {period['included_gpu_seconds']:,.0f} "
        f"GPU-seconds used; estimated invoice ${float(period['total_usd']):,.2f} "
        f"(${float(period['monthly_price_usd']):,.2f} monthly, "
        f"${float(period['overage_usd']):,.2f} beyond the allowance)"
    )


def generate(prompt: str, output: Path, options: dict) -> None:
    client = Client()
    started = time.monotonic()
    try:
        response = client.http.post("/api/images", json={"prompt": prompt, **options})
    except httpx.ConnectError:
        raise ClientError(f"could not connect to gpuhost at {client.settings.base_url()}") from None
    if response.status_code == 404 and "model" not in response.text:
        raise ClientError("this server does not offer image generation (Stable Diffusion) yet")
    answer = client._check(response).json()
    images = answer["images"]
    for i, data in enumerate(images):
        target = output if len(images) == 1 else output.with_stem(f"{output.stem}-{i}")
        target.write_bytes(base64.b64decode(data))
        print(f"wrote {target}")
    print(
        f"done in {time.monotonic() - started:.1f}s, {answer['gpu_seconds']:,.3f} GPU-seconds",
        file=sys.stderr,
    )


def fail(exc: ClientError) -> None:
    err.print(f"[red]Error:[/red] {exc}", highlight=False)
    raise typer.Exit(1)
