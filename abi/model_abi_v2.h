/*
 * model_abi_v2.h — the versioned C ABI between the sidecar's model host and a
 * tree-model shared library (lib<name>_v<GIT_SHA>.so). Version 2 adds what a host
 * needs to trust a library before it serves: the model's shape (targets, classes,
 * leaf type), margin or postprocessed outputs per call, and golden vectors — rows
 * and the training library's own outputs for them, embedded by the build.
 *
 * A library exports exactly one symbol:
 *
 *     const struct model_abi_v2 *model_abi_v2_export(void);
 *
 * (A host that speaks v2 also loads libraries exporting model_abi_v1_export, see
 * model_abi_v1.h; those carry no golden vectors, and the sidecar serves them only
 * when its configuration says models.allow_unverified: true.)
 *
 * Ownership: the table, every string and every array in it are static, owned by
 * the library and valid until it is unloaded; the host never frees them. The
 * host owns `rows` and `out` of every call.
 *
 * Thread safety: `predict` must be callable from many threads at once with no
 * locking by the host. `init` is called once, before any `predict`, from one
 * thread; `release` once, after the last `predict` has returned.
 *
 * Compatibility: `abi_version` is MODEL_ABI_V2 for this layout; a host refuses a
 * value it does not know. `struct_size` is sizeof(struct model_abi_v2) as the
 * library was built; later minor versions may only append fields, so a host
 * reads the fields it knows when struct_size is at least their end.
 */
#ifndef MODEL_ABI_V2_H
#define MODEL_ABI_V2_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MODEL_ABI_V2 2u

/* Status codes returned by init and predict (the same as v1). */
#define MODEL_OK 0
#define MODEL_ERR_ARGUMENT 1 /* a null pointer, n_rows too large, an unknown flag */
#define MODEL_ERR_INTERNAL 2 /* e.g. out of memory */

/* predict flags. Without MODEL_PREDICT_MARGIN the model's postprocessing
   (`postprocessor`: sigmoid, softmax, exponential, ...) is applied, so outputs
   are what the training library's predict() returns; with it, the raw sums of
   the trees (XGBoost's output_margin, LightGBM's raw_score). Other bits must be 0. */
#define MODEL_PREDICT_MARGIN 1u

#if defined(__GNUC__) || defined(__clang__)
#define MODEL_ABI_EXPORT __attribute__((visibility("default")))
#else
#define MODEL_ABI_EXPORT
#endif

struct model_abi_v2 {
    uint32_t abi_version;  /* == MODEL_ABI_V2 */
    uint32_t struct_size;  /* sizeof(struct model_abi_v2) in the library */
    const char *name;      /* e.g. "mev"; NUL-terminated, static */
    const char *version;   /* e.g. the git SHA of the build; NUL-terminated, static */
    uint32_t n_features;   /* floats per input row */
    uint32_t n_outputs;    /* floats per output row: n_targets * max_n_class */
    uint32_t n_targets;    /* targets of the model (1 for most) */
    uint32_t max_n_class;  /* classes of the widest target (1 = regression or binary) */
    const char *leaf_type;     /* "float32" or "float64": the type tl2cgen computes in */
    const char *postprocessor; /* e.g. "identity", "sigmoid", "softmax", "exponential" */
    const char *trainer;       /* e.g. "xgboost 2.1.4 binary:logistic"; informative */

    /* Optional (may be NULL). MODEL_OK or an error; the host refuses the library
       on an error. */
    int32_t (*init)(void);
    /* rows: n_rows * n_features floats, row-major; NaN = missing value.
       out:  n_rows * n_outputs floats, written only on MODEL_OK.
       flags: 0 or MODEL_PREDICT_MARGIN. */
    int32_t (*predict)(const float *rows, size_t n_rows, uint32_t flags, float *out);
    /* Optional (may be NULL). */
    void (*release)(void);

    /* Golden vectors, written by the build from the training library itself:
       golden_rows: n_golden * n_features floats (NaN = missing);
       golden_outputs: n_golden * n_outputs doubles, the training library's
         predict() for those rows (postprocessed);
       golden_margins: the same for margins, or NULL when the training library has
         no margin output (scikit-learn);
       golden_scales: n_golden doubles, per row the size of the numbers the model
         adds up (|base score| + the sum of |leaf value| over the leaves reached),
         or NULL (then 0).
       A host runs predict on golden_rows and compares before it serves:
         |served - reference| <= 1e-5 * max(|reference|, 0.1, golden_scales[row]).
       The scale term is there for float32 models: their sums of large leaves that
       cancel are only that exact, in the training library as much as here. */
    uint32_t n_golden;
    const float *golden_rows;
    const double *golden_outputs;
    const double *golden_margins;
    const double *golden_scales;
};

MODEL_ABI_EXPORT const struct model_abi_v2 *model_abi_v2_export(void);

#ifdef __cplusplus
}
#endif

#endif /* MODEL_ABI_V2_H */
