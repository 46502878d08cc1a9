// select.cuh: building part of a kernel file.
//
// A file with many entry points (every dtype, head dim and pass) is slow to compile whole, and a run
// needs a few of them. Its instantiation lines are wrapped in `#if SELECTED(dim, type, part)`; a module
// compiled with -DSELECT_HEAD_DIM=64 -DSELECT_TYPE=2 -DSELECT_PART=1 keeps only the matching lines.
// A selector left undefined (or 0) matches everything, and so does a 0 in a line's tag (an entry point
// that has no head dim, say). Codes (tinygrad_llm/gpu/compiler.selection writes the flags):
//   type: 1 float32, 2 bfloat16, 3 float16;  part: 1 forward, 2 backward, 3 the backward's passes around
//   the main kernel (Δ, the dq accumulator, its conversion).
// Without any -DSELECT_ flag (nvcc in CI, the whole-file build) every entry point is compiled.
#pragma once

#ifndef SELECT_HEAD_DIM
#define SELECT_HEAD_DIM 0
#endif
#ifndef SELECT_TYPE
#define SELECT_TYPE 0
#endif
#ifndef SELECT_PART
#define SELECT_PART 0
#endif

#define SELECT_MATCHES(SELECTOR, TAG) ((SELECTOR) == 0 || (TAG) == 0 || (SELECTOR) == (TAG))
#define SELECTED(DIM, TYPE, PART) \
    (SELECT_MATCHES(SELECT_HEAD_DIM, DIM) && SELECT_MATCHES(SELECT_TYPE, TYPE) && SELECT_MATCHES(SELECT_PART, PART))
