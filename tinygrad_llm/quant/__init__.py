"""Quantization: the weight formats (formats.py, the public API below) and quantized runs (runs.py).

`import tinygrad_llm.quant` loads only the formats (NumPy, no model): the ops layer may import it.
"""
from .formats import (BLOCK_BYTES, BLOCK_KINDS, BLOCK_SIZE, DEQUANTIZE, KINDS, QUANTIZE, QuantFormatError, QuantizedMatrix,
                      blocks_shape, check_blocks, dequantize_int8, dequantize_q4_0, dequantize_q8_0, quantize_int8,
                      quantize_q4_0, quantize_q8_0)

__all__ = ["BLOCK_BYTES", "BLOCK_KINDS", "BLOCK_SIZE", "DEQUANTIZE", "KINDS", "QUANTIZE", "QuantFormatError", "QuantizedMatrix",
           "blocks_shape", "check_blocks", "dequantize_int8", "dequantize_q4_0", "dequantize_q8_0", "quantize_int8",
           "quantize_q4_0", "quantize_q8_0"]
