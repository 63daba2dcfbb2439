"""The benchmark's reference servers, started by scripts/benchmark.py in the same run.

    python scripts/peers.py floor PORT          # the HTTP floor
    python scripts/peers.py kserve PORT URI     # a plain KServe custom predictor

* floor: a bare ASGI app on uvicorn that answers every POST with one constant V1
  prediction. No server on this machine answers faster over HTTP, so "this server minus
  the floor" is what the server itself costs.
* kserve: a KServe custom predictor as KServe's samples write one: the registered model
  through MLflow's own loader (`mlflow.sklearn.load_model`), a pandas frame per request,
  `predict_proba`. It takes the feature rows the model's signature describes (like
  `mlflow models serve`), so validation and feature building are not its cost.
"""

from __future__ import annotations

import sys

FLOOR_ANSWER = b'{"predictions":[{"fraud_probability":0.5,"is_fraud":false}],"model_version":"0"}'


async def floor_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole body, as a real server must
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": FLOOR_ANSWER})


def serve_floor(port: int) -> None:
    import uvicorn

    uvicorn.run(floor_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_kserve_peer(port: int, model_uri: str) -> None:
    import mlflow.sklearn
    import pandas as pd
    from kserve import Model, ModelServer

    from predictor.features import FEATURE_NAMES

    class PyfuncPredictor(Model):
        def __init__(self, name: str):
            super().__init__(name)
            self.model = mlflow.sklearn.load_model(model_uri)
            self.ready = True

        def predict(self, payload: dict, headers: dict | None = None) -> dict:
            frame = pd.DataFrame(payload["instances"], columns=list(FEATURE_NAMES))
            return {"predictions": self.model.predict_proba(frame)[:, 1].tolist()}

    ModelServer(http_port=port, enable_grpc=False).start([PyfuncPredictor("peer")])


if __name__ == "__main__":
    if sys.argv[1] == "floor":
        serve_floor(int(sys.argv[2]))
    else:
        serve_kserve_peer(int(sys.argv[2]), sys.argv[3])
