"""Base models, prepared offline: the `tiny` and `smollm2` presets, local directories and hub ids
(``prepare``), and quantized checkpoints made with llm-compressor (``quantize``). `loraloop serve`,
`init-model` and `quantize` call them before anything is served; the request path never imports them."""
