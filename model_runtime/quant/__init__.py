"""Weight-only INT8 / INT4 quantization in the published THUDM storage format.

`format` is the storage format and its reference arithmetic; `kernel`, `cpu_kernels` and
`cuda_kernels` compute a quantized Linear per device, `backends` picks one at load time; `linear`
is the nn.Module (`QuantizedLinear`, and the opt-in INT8 output layer); `convert` quantizes a
whole model (or prepares an empty one for the loader); `saving` writes a quantized checkpoint;
`memory` holds the scratch buffers and heap trimming the kernels and the loader share."""
