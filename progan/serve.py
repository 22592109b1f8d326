"""A small web page to look at a checkpoint's generator: python -m progan.serve

    python -m progan.serve --checkpoint CKPT [--port 8000] [--host 127.0.0.1] [--raw] [--device auto|cpu|cuda]

Open http://127.0.0.1:8000/ : pick a resolution the run has trained, a seed (or a random one) and
a number of images, see the grid, drag a slider that interpolates (slerp) between two of its
images, download the grid as a PNG. The EMA generator draws (--raw: the trained G's), on the GPU
when there is one. The same seed gives the same images as `python -m progan.generate` (the page
shows them at their own pixels, enlarged by the browser; --truncation there is the page's psi).

The page uses this JSON/PNG API (FastAPI, served by uvicorn):
  GET /api/info              the checkpoint: resolutions, latent size, alpha, images seen, limits
  GET /api/grid.png          ?resolution=R&seed=S&num=N&truncation=PSI[&download=1]
  GET /api/interpolate.png   the same, plus &a=I&b=J&t=T: images I and J of that grid (1-based), slerp at T
A bad request (a resolution the run has not trained, a seed that is not a number) is answered
4xx with {"error": "one line"}, which the page shows. Binds 127.0.0.1 unless --host says otherwise.
A request whose Host header names another host (a page reaching the port through DNS rebinding)
is answered 400 "Invalid host header": see `allowed_hosts`.
"""
from __future__ import annotations

import argparse
import io
import ipaddress
import sys
import threading
from pathlib import Path

from PIL import Image

from base.errors import OneLineParser, UserError, run_cli
from base.ports import check_port_free
from progan.generate import (MAX_SEED, grid_columns, pixels_image, render, seeded_latents,
                             slerp)
from progan.model.samples import grid_image
from progan.model.trained import TrainedGenerator, add_generator_args, load_trained_generator, pick_device

PROG = "python -m progan.serve"
STATIC = Path(__file__).with_name("static")
MAX_NUM = 64  # images per grid


class Studio:
    """The loaded generator and one lock: requests render one at a time (the truncation hook
    changes the network while it draws)."""

    def __init__(self, trained: TrainedGenerator, raw: bool):
        self.trained = trained
        self.raw = raw
        self.lock = threading.Lock()

    def info(self) -> dict:
        t = self.trained
        return {"checkpoint": str(t.path), "resolution": t.resolution, "alpha": t.alpha,
                "resolutions": [2 ** k for k in range(2, t.resolution.bit_length())],
                "latent_size": t.latent_size, "images_seen": t.images_seen, "weights": "raw" if self.raw else "ema",
                "device": str(next(t.generator.parameters()).device), "max_num": MAX_NUM}

    def grid(self, resolution: int, seed: int, num: int, psi: float) -> Image.Image:
        latents = seeded_latents(num, self.trained.latent_size, seed)
        with self.lock:
            images = render(self.trained, latents, resolution, psi)
        return grid_image(images, grid_columns(num), min_tile=1)

    def between(self, resolution: int, seed: int, num: int, a: int, b: int, t: float, psi: float) -> Image.Image:
        latents = seeded_latents(num, self.trained.latent_size, seed)
        z = slerp(latents[a - 1:a], latents[b - 1:b], t)
        with self.lock:
            image = render(self.trained, z, resolution, psi)[0]
        return pixels_image(image)


def png_response(image: Image.Image, download_name: str | None):
    from fastapi import Response

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    headers = {"Cache-Control": "no-store"}
    if download_name:
        headers["Content-Disposition"] = f'attachment; filename="{download_name}"'
    return Response(buffer.getvalue(), media_type="image/png", headers=headers)


def validation_message(exc) -> str:
    """FastAPI's list of field errors -> one line: 'seed: Input should be a valid integer (got 'abc')'."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(x) for x in error.get("loc", ())[1:]) or "request"
        got = f" (got {error['input']!r})" if "input" in error and error["input"] is not None else ""
        parts.append(f"{field}: {error.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # bind addresses that listen on every interface


def allowed_hosts(host: str) -> list[str]:
    """The names a request's Host header may give, for a server bound to `host`. A web page whose
    own name an attacker's DNS turns into 127.0.0.1 (DNS rebinding) reaches the port, but its
    requests still carry that name, so they are refused. The port is not compared: such a request
    reached this port already. Bound to every address (0.0.0.0, ::) the page was opened to the
    network on purpose, under names this process cannot list: any name is answered."""
    if host in WILDCARD_HOSTS:
        return ["*"]
    names = [f"[{host}]" if ":" in host else host]
    if host == "localhost" or is_loopback(host):
        names += [name for name in ("localhost", "127.0.0.1", "[::1]") if name not in names]
    return names


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return False


def create_app(studio: Studio, host: str = "127.0.0.1"):
    """The page and its API, answering only requests addressed to `host` (`allowed_hosts`)."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="ProGAN generator", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host), www_redirect=False)

    @app.exception_handler(RequestValidationError)
    async def bad_field(_request: Request, exc: RequestValidationError):
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def bad_request(_request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    def trained_resolution(resolution: int | None) -> int:
        """The request's resolution, checked against the run's (HTTP 400 in one line otherwise)."""
        resolution = resolution or studio.trained.resolution
        try:
            studio.trained.check_resolution(resolution)
        except UserError as exc:
            raise HTTPException(400, str(exc)) from None
        return resolution

    Seed = Query(0, ge=0, le=MAX_SEED)
    Num = Query(16, ge=1, le=MAX_NUM)
    Psi = Query(1.0, ge=0.0, le=2.0, allow_inf_nan=False)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    def info():
        return studio.info()

    @app.get("/api/grid.png")
    def grid(resolution: int | None = None, seed: int = Seed, num: int = Num, truncation: float = Psi,
             download: bool = False):
        resolution = trained_resolution(resolution)
        image = studio.grid(resolution, seed, num, truncation)
        name = f"progan-{resolution}px-seed{seed}-{num}.png" if download else None
        response = png_response(image, name)
        response.headers["X-Grid-Columns"] = str(grid_columns(num))
        return response

    @app.get("/api/interpolate.png")
    def interpolate(resolution: int | None = None, seed: int = Seed, num: int = Num, truncation: float = Psi,
                    a: int = Query(1, ge=1), b: int = Query(2, ge=1), t: float = Query(0.5, ge=0.0, le=1.0)):
        resolution = trained_resolution(resolution)
        if max(a, b) > num:
            raise HTTPException(400, f"image {max(a, b)}: the grid has {num} images")
        return png_response(studio.between(resolution, seed, num, a, b, t, truncation), None)

    return app


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description="A web page to look at a checkpoint's generator.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(p, "--checkpoint")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    add_generator_args(p, "--raw", "--device")
    return p.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    check_port_free("--port", args.port, args.host)
    trained = load_trained_generator(args.checkpoint, raw=args.raw, device=pick_device(args.device))
    import uvicorn

    app = create_app(Studio(trained, args.raw), args.host)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {trained.path} at http://{shown}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
