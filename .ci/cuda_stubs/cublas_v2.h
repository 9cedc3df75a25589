// Stub for `make cuda-check` only: the few declarations the torch CUDA headers need to parse the
// bindings on a machine whose CPU torch ships no CUDA libraries. Never used in a build.
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
