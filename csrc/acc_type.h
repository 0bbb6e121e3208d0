// The accumulation dtype of every madfast kernel: fp64 for fp64 inputs, fp32 for the others
// (the same rule as madfast.ops._dtypes.acc_dtype).
#pragma once

#include <c10/core/ScalarType.h>

namespace madfast {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace madfast
