"""tensorrt_llm (cpu flavour): the reference runtime's Engine behind TensorRT-LLM's tensor API.

Decoupled: `execute` hands each request to its own thread, which submits it to the engine's
in-flight batching scheduler and streams its steps as responses; concurrent requests share decode
steps. A client cancel (or disconnect) is seen within one poll and cancels the request, whose slot
the engine frees at its next step. A full wait queue answers "engine busy" (UNAVAILABLE).
`Engine.start` launches the TP worker processes with subprocess (multiprocessing does not work
inside the python-backend stub); `finalize` closes them.
"""

import contextlib
import json
import sys
import threading

import triton_python_backend_utils as pb_utils

INPUTS = ("input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list",
          "bad_words_list", "temperature", "runtime_top_k", "runtime_top_p", "seed", "streaming")


def _params(args):
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    if params["export_root"] not in sys.path:
        sys.path.insert(0, params["export_root"])
    return params


def _error(msg, code_name="INVALID_ARG"):
    code = getattr(pb_utils.TritonError, code_name, None) if code_name else None
    err = pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from pathlib import Path

        import torch

        torch.set_num_threads(1)
        from export.runtime.engine import Engine
        from export.runtime.scheduler import BusyError
        from export.triton import pipeline

        self.BusyError = BusyError
        self.pipeline = pipeline
        self.max_seq_len = int(p["max_seq_len"])
        kv_tokens = int(p.get("kv_cache_tokens", "0")) or None
        self.engine = Engine.start(Path(p["checkpoint_dir"]), tp=int(p["tp"]), pp=int(p["pp"]), dtype=p["dtype"],
                                   max_batch=int(p["max_num_sequences"]), max_queue=int(p["max_queue_requests"]),
                                   kv_cache_tokens=kv_tokens)
        self.runner = pipeline.EngineRunner(self.engine)
        self.threads = set()

    def execute(self, requests):
        for request in requests:
            t = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.threads.add(t)
            t.start()
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            inputs = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if t is None else t.as_numpy()
            req = self.pipeline.engine_request(inputs, self.max_seq_len)
            with contextlib.closing(self.runner.steps(req, sender.is_cancelled)) as steps:  # closing cancels
                for step in steps:
                    out = self.pipeline.engine_outputs(step)
                    response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()])
                    sender.send(response, flags=final if step.final else 0)
                    if step.final:
                        return
            sender.send(flags=final)
        except self.pipeline.RequestError as e:
            sender.send(_error(str(e)), flags=final)
        except self.BusyError as e:
            sender.send(_error(str(e), "UNAVAILABLE"), flags=final)
        except Exception as e:  # an engine failure ends this request, not the server
            sender.send(_error(f"engine error: {type(e).__name__}: {e}", None), flags=final)
        finally:
            self.threads.discard(threading.current_thread())

    def finalize(self):
        for t in list(self.threads):
            t.join(timeout=10)
        self.engine.close()
