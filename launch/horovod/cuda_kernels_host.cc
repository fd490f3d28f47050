// Horovod's three CUDA kernels, done with CUDA runtime calls instead, for a Horovod build with
// NCCL but without nvcc: PyPI's CUDA 12 wheels carry ptxas and the runtime, not nvcc, and the
// CUDA 13 nvcc that PyPI has would bring a second CUDA runtime into TensorFlow's CUDA 12 process.
//
// The batched device-to-device copy (packing tensors into the fusion buffer) becomes one
// cudaMemcpyAsync per tensor on the same stream: the same bytes, in the same stream order. The
// two scaling kernels only run for Horovod's Average, prescale or postscale reductions on GPU
// tensors; a factor of 1 is a copy, any other factor is refused with an error naming the build.
// distaccum reduces with Sum and divides once itself, so it never scales here.

#include <stdexcept>
#include <string>

#include "cuda_kernels.h"

namespace horovod {
namespace common {

namespace {

void Check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorString(status));
  }
}

void RefuseScaling(double scale_factor) {
  throw std::logic_error(
      "this Horovod build (distaccum's launch/setup.sh --gpu) has no CUDA kernels, so it cannot "
      "scale GPU tensors (Average, prescale_factor or postscale_factor; scale factor " +
      std::to_string(scale_factor) + "): reduce with op=Sum and divide afterwards");
}

}  // namespace

void BatchedD2DMemcpyCudaImpl(BatchedD2DParams& params, int num_copies, cudaStream_t stream) {
  for (int i = 0; i < num_copies; ++i) {
    Check(cudaMemcpyAsync(params.out[i], params.in[i], params.sizes[i], cudaMemcpyDeviceToDevice,
                          stream),
          "cudaMemcpyAsync");
  }
}

void ScaleBufferCudaImpl(const void* fused_input_data, void* buffer_data, const int64_t num_elements,
                         double scale_factor, DataType dtype, cudaStream_t stream) {
  if (scale_factor != 1.0) RefuseScaling(scale_factor);
  if (fused_input_data == buffer_data) return;
  Check(cudaMemcpyAsync(buffer_data, fused_input_data, num_elements * DataType_Size(dtype),
                        cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpyAsync");
}

void BatchedScaledD2DMemcpyCudaImpl(BatchedD2DParams& params, int num_copies, double scale_factor,
                                    DataType dtype, cudaStream_t stream) {
  if (scale_factor != 1.0) RefuseScaling(scale_factor);
  BatchedD2DMemcpyCudaImpl(params, num_copies, stream);
}

}  // namespace common
}  // namespace horovod
