"""tensorrt_llm (cpu flavour): the reference runtime's Engine behind TensorRT-LLM's tensor API.

Decoupled: `execute` hands each request to its own thread, which submits it to the engine's
in-flight batching scheduler and streams its steps as responses; concurrent requests share decode
steps. A client cancel (or disconnect) is seen within one poll and cancels the request, whose slot
the engine frees at its next step; so does a request with the same request id and `stop` = true
(TensorRT-LLM's input; the BLS sends it when its own client cancels, postprocessing when the
ensemble's client does: every response carries `request_key`, and pipeline.stop_id(key) is a
request id this request answers to). A full wait queue answers "engine busy" (UNAVAILABLE).
At tp x pp > 1 `Engine.start` launches the worker processes with subprocess (multiprocessing does not work
inside the python-backend stub); `finalize` closes them.

Errors: every request gets exactly one final response. The BLS (its request ids start with
pipeline.IN_BAND_PREFIX, and it requests `error_message`) gets an error as a normal final response
carrying that output, because Triton 2.51's BLS response iterator drops a decoupled model's error
responses mid-stream (measured: with the final flag on the error the BLS waited forever, without it
the stream looked complete).

Health (export.triton.health.EngineWatchdog): a watchdog sees a TP worker exit within HEALTH_POLL_S.
The engine cannot serve again (its TP group is broken), so the model fails every running and waiting
request with the reason, answers new ones UNAVAILABLE, and SIGTERMs tritonserver: readiness goes false
at once and the server exits, so an orchestrator routes traffic elsewhere and restarts it (a python
model cannot make 2.51's readiness false any other way). If this stub itself dies, the reaper of `export.triton.server`
does the same.
"""

import contextlib
import itertools
import json
import sys
import threading

import triton_python_backend_utils as pb_utils

CANCEL_POLL_S = 0.02  # how often a stream asks the server whether its client cancelled (stub.at_most_every)
INPUTS = ("input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list",
          "bad_words_list", "temperature", "runtime_top_k", "runtime_top_p", "seed", "streaming", "stop")


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from pathlib import Path

        import torch

        torch.set_num_threads(1)
        # The engine's driver thread and the request threads share this process's GIL; with the
        # default 5 ms switch interval a token's send could hold the driver back for a whole
        # interval. 0.5 ms: 73-76 -> 79-81 tokens/s at 1 stream (direct runtime 83-85), no loss at 16.
        sys.setswitchinterval(0.0005)
        from export.runtime.engine import Engine
        from export.runtime.scheduler import BusyError
        from export.triton import pipeline, stub

        self.BusyError = BusyError
        self.pipeline, self.stub = pipeline, stub
        kv_tokens = int(p.get("kv_cache_tokens", "0")) or None
        sched = {"max_batch": int(p["max_num_sequences"]), "max_queue": int(p["max_queue_requests"]),
                 "kv_cache_tokens": kv_tokens, "max_seq_len": int(p["max_seq_len"])}  # the build's: the one limit
        # `runtime` is a name in export.runtime.registry; `package` rendered tp/pp/dtype it can run
        # (tp = pp = 1 runs in this process: measured faster than a worker process, no IPC per step;
        # the model's ops release the GIL, 85 vs 62 tokens/s at 1 stream, 409 vs 328 at 16)
        self.engine = Engine.start(Path(p["checkpoint_dir"]), tp=int(p["tp"]), pp=int(p["pp"]), dtype=p["dtype"],
                                   runtime=p.get("runtime", "torch"), **sched)
        self.runner = pipeline.EngineRunner(self.engine)
        self.threads = set()
        self.lock = threading.Lock()
        self.stops = {}  # request id -> events of its running requests (the `stop` input sets them)
        self.keys = itertools.count(1)  # each request's key: postprocessing stops it by pipeline.stop_id(key)
        self.stopping = threading.Event()
        self.metrics = self._start_metrics()
        from export.triton.health import EngineWatchdog

        self.health = EngineWatchdog(self.engine, pb_utils.Logger.log_error)  # see the module doc

    def _start_metrics(self):
        """The scheduler's load as gauges on Triton's metrics endpoint (`cpu_engine_scheduler{state=...}`)."""
        family_cls = getattr(pb_utils, "MetricFamily", None)
        if family_cls is None:
            return None
        family = family_cls(name="cpu_engine_scheduler", description="in-flight batching: requests running, "
                            "waiting, KV tokens reserved, steps run", kind=family_cls.GAUGE)
        gauges = {k: family.Metric(labels={"state": k}) for k in ("running", "waiting", "kv_tokens", "steps")}

        def publish():
            while not self.stopping.wait(0.1):
                for k, v in self.engine.scheduler.load().items():
                    gauges[k].set(v)

        thread = threading.Thread(target=publish, name="engine-metrics", daemon=True)
        thread.start()
        return family, gauges, thread

    def execute(self, requests):
        for request in requests:
            if self.health.down is not None:
                self._error(request.get_response_sender(), request, self.health.down, "UNAVAILABLE")
                continue
            self.stub.serve_in_thread(self._serve, request, self.threads)
        return None

    def _stop(self, request_id):
        """TensorRT-LLM's `stop` input: end the running request(s) with this request id."""
        with self.lock:
            for event in self.stops.get(request_id, ()):
                event.set()

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        rid, stop, key = request.request_id(), threading.Event(), next(self.keys)
        names = [n for n in (rid, self.pipeline.stop_id(key)) if n]
        try:
            inputs = self.stub.gather(pb_utils, request, INPUTS)
            if inputs["stop"] is not None and bool(inputs["stop"].reshape(-1)[0]):
                self._stop(rid)
                sender.send(flags=final)
                return
            req = self.pipeline.engine_request(inputs, self.engine.max_seq_len, self.engine.spec.vocab)
            with self.lock:
                for n in names:
                    self.stops.setdefault(n, []).append(stop)
            client_gone = self.stub.at_most_every(CANCEL_POLL_S, sender.is_cancelled)
            cancelled = lambda: stop.is_set() or client_gone()  # noqa: E731
            with contextlib.closing(self.runner.steps(req, cancelled)) as steps:  # closing cancels
                for step in steps:
                    out = self.pipeline.engine_outputs(step, key)
                    sender.send(self.stub.response(pb_utils, out), flags=final if step.final else 0)
                    if step.final:
                        return
            sender.send(flags=final)
        except self.pipeline.RequestError as e:
            self._error(sender, request, str(e))
        except self.BusyError as e:
            self._error(sender, request, str(e), "UNAVAILABLE")
        except Exception as e:  # an engine failure ends this request, not the server
            self._error(sender, request, f"engine error: {type(e).__name__}: {e}", None)
        finally:
            self.threads.discard(threading.current_thread())
            with self.lock:
                for n in names:
                    if stop in self.stops.get(n, ()):
                        self.stops[n].remove(stop)
                        if not self.stops[n]:
                            del self.stops[n]

    def _error(self, sender, request, msg, code="INVALID_ARG"):
        """The request's final response is this error: in-band for the BLS (see module doc)."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self.pipeline.wants_in_band_errors(request.request_id(), request.requested_output_names()):
            sender.send(self.stub.response(pb_utils, self.pipeline.error_outputs(msg)), flags=final)
        else:
            sender.send(self.stub.error(pb_utils, msg, code), flags=final)

    def finalize(self):
        self.stopping.set()
        self.health.close()
        if self.metrics is not None:
            family, gauges, thread = self.metrics
            thread.join(timeout=5)
            # Metrics, then their family, are deleted here, while the stub can still send the delete
            # messages: left to interpreter exit, their destructors run after the stub has dropped its
            # shared-memory pool and segfault (Metric::SaveToSharedMemory on a null pool).
            gauges.clear()
            self.metrics = None
            del family, gauges, thread
        self.engine.scheduler.close()  # requests still running or waiting end with an error now
        for t in list(self.threads):
            t.join(timeout=10)
        self.engine.close()


def _params(args):
    """The model's parameters; first `export_root` (rendered by `package`) goes on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["export_root"]["string_value"]
    sys.path[:0] = [] if root in sys.path else [root]
    from export.triton.stub import model_params

    return model_params(args)
