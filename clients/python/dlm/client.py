"""A small synchronous client over the generator's gRPC API."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc

from dlm._proto.dlm.v1 import generator_pb2 as pb
from dlm._proto.dlm.v1 import generator_pb2_grpc as pb_grpc

Targets = Union[Mapping[str, str], Iterable[str]]

# The generator CLI's names for the enums (`--guidance-space estimate`, `--sampler ddim`, …).
_SPACES = {"latent": pb.GUIDANCE_SPACE_LATENT, "estimate": pb.GUIDANCE_SPACE_ESTIMATE}
_UPDATES = {"adagrad": pb.GUIDANCE_UPDATE_ADAGRAD, "sign": pb.GUIDANCE_UPDATE_SIGN,
            "normalized": pb.GUIDANCE_UPDATE_NORMALIZED, "proximal": pb.GUIDANCE_UPDATE_PROXIMAL}
_SAMPLERS = {"ddpm": pb.SAMPLER_DDPM, "ddim": pb.SAMPLER_DDIM}


class DlmError(Exception):
    """A request the generator refused or failed: its gRPC status code name and message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _choice(kind: str, table: Mapping[str, int], value: str) -> int:
    try:
        return table[value.lower()]
    except KeyError:
        raise ValueError(f"{kind} must be one of {', '.join(table)}, got {value!r}") from None


def _set_given(message, fields: Sequence[tuple[str, object]]) -> None:
    """Sets the fields given a value; the ones left None keep the server's defaults."""
    for name, value in fields:
        if value is not None:
            setattr(message, name, value)


def _targets(controls: Optional[Targets]) -> list[str]:
    if controls is None:
        return []
    if isinstance(controls, Mapping):
        return [f"{k}={v}" for k, v in controls.items()]
    return [str(c) for c in controls]


class Client:
    """`Client("127.0.0.1:8000")`; for TLS, `Client("host:8000", ca="ca.pem")`."""

    def __init__(self, endpoint: str = "127.0.0.1:8000", *, ca: Optional[str] = None,
                 timeout: Optional[float] = None):
        endpoint = endpoint.removeprefix("http://").removeprefix("https://")
        if ca is None:
            self._channel = grpc.insecure_channel(endpoint)
        else:
            with open(ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.secure_channel(endpoint, creds)
        self._stub = pb_grpc.GeneratorStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def request(n: int = 1, controls: Optional[Targets] = None, *, guide: str = "",
                weight: Optional[float] = None, steps: Optional[int] = None,
                seed: Optional[int] = None, length: Optional[int] = None,
                template: Optional[Sequence[str]] = None, best_of: Optional[int] = None,
                progress_every: Optional[int] = None, pos: Optional[Union[str, Sequence[str]]] = None,
                spans: Optional[Sequence[tuple[int, int, str]]] = None,
                sampler: Optional[str] = None, clamp: Optional[bool] = None,
                clamp_repeat_penalty: Optional[float] = None,
                guidance_space: Optional[str] = None, satisfied_prob: Optional[float] = None,
                guidance_steps: Optional[int] = None, step_size: Optional[float] = None,
                guidance_update: Optional[str] = None, fluency_weight: Optional[float] = None,
                guide_from: Optional[int] = None, guide_until: Optional[int] = None,
                estimate_until: Optional[int] = None) -> pb.GenerateRequest:
        """A GenerateRequest: `controls` as {"food": "Italian"} or ["food=Italian"]; `template`
        as words with "_" for blanks; `pos` as "DT NN VBZ …" (a tag per word, "_" = any) and
        `spans` as [(start, end, "NP")] (word indices from 0, end inclusive) for the syntax guides.
        The guidance options are `dlm-generator generate`'s flags of the same names (the control
        preset: guidance_space="estimate", satisfied_prob=0.9, best_of=4); unset ones take the
        server's defaults."""
        r = pb.GenerateRequest(n=n)
        if sampler is not None:
            r.sampler = _choice("sampler", _SAMPLERS, sampler)
        g = r.guidance
        if guidance_space is not None:
            g.space = _choice("guidance_space", _SPACES, guidance_space)
        if guidance_update is not None:
            g.update = _choice("guidance_update", _UPDATES, guidance_update)
        _set_given(g, [("satisfied_prob", satisfied_prob),
                       ("steps_per_diffusion_step", guidance_steps), ("step_size", step_size),
                       ("fluency_weight", fluency_weight), ("start_step", guide_from),
                       ("stop_step", guide_until), ("estimate_until", estimate_until)])
        targets = _targets(controls)
        if targets:
            c = r.controls.add(guide=guide, targets=targets)
            if weight is not None:
                c.weight = weight
        _set_given(r, [("steps", steps), ("seed", seed), ("length", length),
                       ("best_of", best_of), ("progress_every", progress_every), ("clamp", clamp),
                       ("clamp_repeat_penalty", clamp_repeat_penalty)])
        if template:
            r.infill.template.extend(template)
        if pos:
            r.syntax.pos.extend(pos.split() if isinstance(pos, str) else pos)
        for start, end, label in spans or []:
            r.syntax.spans.add(start=start, end=end, label=label)
        return r

    def _call(self, method, req, timeout):
        try:
            return method(req, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise DlmError(e.code().name, e.details()) from None

    def generate(self, n: int = 1, controls: Optional[Targets] = None, *,
                 timeout: Optional[float] = None, **options) -> pb.GenerateResponse:
        """Generates `n` texts; the response has `.samples[i].text`, `.seed`, `.timings`."""
        return self._call(self._stub.Generate, self.request(n, controls, **options), timeout)

    def texts(self, n: int = 1, controls: Optional[Targets] = None, **options) -> list[str]:
        return [s.text for s in self.generate(n, controls, **options).samples]

    def stream(self, n: int = 1, controls: Optional[Targets] = None, *,
               timeout: Optional[float] = None, **options
               ) -> Iterator[Union[pb.Progress, pb.GenerateResponse]]:
        """Yields Progress messages (the current x0 texts) every `progress_every` steps, then the
        GenerateResponse."""
        req = self.request(n, controls, **options)
        try:
            for ev in self._stub.GenerateStream(
                    req, timeout=timeout if timeout is not None else self.timeout):
                yield ev.progress if ev.HasField("progress") else ev.result
        except grpc.RpcError as e:
            raise DlmError(e.code().name, e.details()) from None

    def describe(self) -> pb.DescribeResponse:
        """The model, the registered guides with their fields and values, readiness."""
        return self._call(self._stub.Describe, pb.DescribeRequest(), None)
