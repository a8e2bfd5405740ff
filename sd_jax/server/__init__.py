"""sd_jax's HTTP server: AUTOMATIC1111's web API (`/sdapi/v1`) and a page at `/` (scripts/serve.py).

    python scripts/serve.py --port=7860                      # the default model, on 127.0.0.1
    curl -s localhost:7860/sdapi/v1/txt2img -d '{"prompt": "a red circle on a blue background", "width": 64,
         "height": 64, "steps": 20}'

`worker.py` owns the model and batches requests; `a1111.py` translates AUTOMATIC1111's bodies and answers;
`app.py` is the FastAPI application; `models.py` the models requests may name. Install with `pip install ".[server]"`.
"""
