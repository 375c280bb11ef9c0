/*
 * model_abi_v1.h — the versioned C ABI between the sidecar's model host and a
 * tree-model shared library (libmev_v<GIT_SHA>.so, libarb_v<GIT_SHA>.so).
 *
 * A library exports exactly one symbol:
 *
 *     const struct model_abi_v1 *model_abi_v1_export(void);
 *
 * Ownership: the returned table and every string in it are static, owned by the
 * library, and valid until the library is unloaded; the host never frees them.
 * The host owns `rows` and `out` of every call.
 *
 * Thread safety: `predict` must be callable from many threads at once, with no
 * locking by the host (the tl2cgen adapter keeps no mutable state). `init` is
 * called once, before any `predict`, from one thread; `release` once, after the
 * last `predict` has returned.
 *
 * Compatibility: `abi_version` is MODEL_ABI_V1 for this layout; a host refuses any
 * other value. `struct_size` is sizeof(struct model_abi_v1) as the library was
 * built; later minor versions may only append fields, so a host reads the fields
 * it knows when struct_size is at least their end.
 */
#ifndef MODEL_ABI_V1_H
#define MODEL_ABI_V1_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MODEL_ABI_V1 1u

/* Status codes returned by init and predict. */
#define MODEL_OK 0
#define MODEL_ERR_ARGUMENT 1  /* a null pointer or n_rows too large */
#define MODEL_ERR_INTERNAL 2  /* e.g. out of memory */

#if defined(__GNUC__) || defined(__clang__)
#define MODEL_ABI_EXPORT __attribute__((visibility("default")))
#else
#define MODEL_ABI_EXPORT
#endif

struct model_abi_v1 {
    uint32_t abi_version;  /* == MODEL_ABI_V1 */
    uint32_t struct_size;  /* sizeof(struct model_abi_v1) in the library */
    const char *name;      /* e.g. "mev"; NUL-terminated, static */
    const char *version;   /* e.g. the git SHA of the build; NUL-terminated, static */
    uint32_t n_features;   /* floats per input row */
    uint32_t n_outputs;    /* floats per output row */
    /* Optional (may be NULL). MODEL_OK or an error; the host refuses the library
       on an error. */
    int32_t (*init)(void);
    /* rows: n_rows * n_features floats, row-major; NaN = missing value.
       out:  n_rows * n_outputs floats, written only on MODEL_OK. */
    int32_t (*predict)(const float *rows, size_t n_rows, float *out);
    /* Optional (may be NULL). */
    void (*release)(void);
};

MODEL_ABI_EXPORT const struct model_abi_v1 *model_abi_v1_export(void);

#ifdef __cplusplus
}
#endif

#endif /* MODEL_ABI_V1_H */
