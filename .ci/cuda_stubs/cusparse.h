// Stub for `make cuda-check` only: the few declarations the torch CUDA headers need to parse the
// bindings on a machine whose CPU torch ships no CUDA libraries. Never used in a build.
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
const char* cusparseGetErrorString(cusparseStatus_t);
