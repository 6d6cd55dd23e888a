"""Concurrent clients against a model on a Triton server: the load that tests/test_triton.py
asserts and tools/triton_load.py records.

Each client is a thread with its own tritonclient (gRPC or HTTP) sending its list of requests one
after another; all start together. Latency is per request, from send to decoded answer.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

CHOICES = 2  # a multiple-choice request's choices
LENGTHS = (24, 64, 128)  # a block multiple and not; merged only with requests of the same length
BATCHES = (1, 2, 4)


def random_feed(inputs, vocab_size: int, batch: int, length: int, generator,
                choices: bool = False) -> dict[str, np.ndarray]:
    """A seeded request for a model taking ``inputs`` (names): ids in the vocabulary, the
    rows' masks ragged (row b has fewer real tokens than row b - 1), token types zero."""
    shape = (batch, CHOICES, length) if choices else (batch, length)
    real = np.maximum(1, length - np.arange(batch) * (length // 4 + 1))
    mask = (np.arange(length)[None, :] < real[:, None]).astype(np.int64)
    arrays = {"input_ids": generator.integers(3, vocab_size, shape, dtype=np.int64),
              "attention_mask": np.broadcast_to(mask[:, None, :] if choices else mask,
                                                shape).copy(),
              "token_type_ids": np.zeros(shape, dtype=np.int64)}
    return {name: arrays[name] for name in inputs}


def mixed_feeds(inputs, vocab_size: int, count: int, seed: int, *, lengths=LENGTHS,
                batches=BATCHES, choices: bool = False) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(seed)
    return [random_feed(inputs, vocab_size, int(generator.choice(batches)),
                        int(generator.choice(lengths)), generator, choices)
            for _ in range(count)]


@dataclasses.dataclass
class LoadResult:
    latencies_s: list[float]
    errors: list[str]
    wall_s: float
    requests: int
    samples: int  # batch rows over all requests
    outputs: list  # per client, per request: {name: array} (when kept)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    @property
    def throughput(self) -> float:
        """Requests answered per second, over the whole run."""
        return len(self.latencies_s) / self.wall_s

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": len(self.errors),
                "p50_ms": round(self.percentile_ms(50), 2),
                "p99_ms": round(self.percentile_ms(99), 2),
                "throughput_requests_per_s": round(self.throughput, 1),
                "throughput_samples_per_s": round(self.samples_per_s, 1),
                "wall_s": round(self.wall_s, 2)}


def client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    return module


def infer(client, module, model: str, feed: dict[str, np.ndarray], outputs) -> dict:
    """One request with ``client`` (of tritonclient ``module``): the named outputs as arrays."""
    tensors = []
    for name, array in feed.items():
        tensor = module.InferInput(name, list(array.shape), _triton_type(array))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer(model, tensors,
                          outputs=[module.InferRequestedOutput(name) for name in outputs])
    return {name: result.as_numpy(name) for name in outputs}


def _triton_type(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def run_load(url: str, model: str, feeds_per_client: list[list[dict]], outputs, *,
             protocol: str = "grpc", keep_outputs: bool = False) -> LoadResult:
    """Every client's feeds sent in order, the clients concurrently; errors collected, not
    raised."""
    module = client_module(protocol)
    latencies, errors = [], []
    kept = [[] for _ in feeds_per_client]
    lock, start = threading.Lock(), threading.Barrier(len(feeds_per_client) + 1)

    def client(index: int, feeds: list[dict]) -> None:
        connection = module.InferenceServerClient(url)
        try:
            start.wait()
            for feed in feeds:
                began = time.perf_counter()
                try:
                    values = infer(connection, module, model, feed, outputs)
                except Exception as error:  # tritonclient raises its own and the transport's
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - began)
                if keep_outputs:
                    kept[index].append(values)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i, feeds), daemon=True)
               for i, feeds in enumerate(feeds_per_client)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    every = [feed for feeds in feeds_per_client for feed in feeds]
    return LoadResult(latencies, errors, wall, len(every),
                      sum(feed["input_ids"].shape[0] for feed in every), kept)


@dataclasses.dataclass
class BatchingStats:
    """A model's counts in Triton's statistics endpoint (cumulative since it loaded)."""
    requests: int  # successful requests
    inferences: int  # their batch rows (Triton's inference_count)
    executions: int  # the model's runs (execution_count): fewer than requests when merged

    def since(self, earlier: BatchingStats) -> BatchingStats:
        return BatchingStats(self.requests - earlier.requests,
                             self.inferences - earlier.inferences,
                             self.executions - earlier.executions)


def batching_stats(url: str, model: str, protocol: str = "grpc") -> BatchingStats:
    module = client_module(protocol)
    client = module.InferenceServerClient(url)
    try:
        if protocol == "grpc":
            stats = client.get_inference_statistics(model, as_json=True)
        else:
            stats = client.get_inference_statistics(model)
    finally:
        client.close()
    model_stats = stats["model_stats"][0]
    success = model_stats.get("inference_stats", {}).get("success", {})
    return BatchingStats(int(success.get("count", 0)), int(model_stats.get("inference_count", 0)),
                         int(model_stats.get("execution_count", 0)))


def batching_stats_since(url: str, model: str, before: BatchingStats, requests: int,
                         protocol: str = "grpc", timeout: float = 10.0) -> BatchingStats:
    """The counts since ``before`` once ``requests`` successful requests are in them, or after
    ``timeout`` seconds, whichever comes first. Triton records a request's statistics when it
    releases the request, which can come after its answer reached the client: read straight
    after a load, the last request is sometimes missing."""
    deadline = time.monotonic() + timeout
    while True:
        counts = batching_stats(url, model, protocol).since(before)
        if counts.requests >= requests or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)
