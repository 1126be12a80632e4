"""Entry point of a Hugging Face Space (Gradio SDK): `python app.py`.

The Space chooses its models with environment variables (Space settings -> Variables):
    VOCALIGN_BASE_MODEL   zero-shot CAT-Seg, folder or Hub id (default: the built-in world's source model)
    VOCALIGN_ADAPTER      VocAlign adapter, folder or Hub id (default: runs/world/adapter; "" for none)
The host comes from GRADIO_SERVER_NAME (a Space sets 0.0.0.0; locally it stays 127.0.0.1).
"""

import os

from vocalign_hf.demo import DEFAULT_ADAPTER, build_demo

demo = build_demo(
    base_model=os.environ.get("VOCALIGN_BASE_MODEL") or None,
    adapter=os.environ.get("VOCALIGN_ADAPTER", DEFAULT_ADAPTER),
)

if __name__ == "__main__":
    demo.launch()
