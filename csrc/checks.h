// Argument checks that name the op and the argument: "memo.ops: pack_tokens: argument 'dim' is 5 ...".
#pragma once

#include <c10/util/Exception.h>

#define MEMO_CHECK_ARG(op, cond, arg, ...) \
  TORCH_CHECK((cond), "memo.ops: ", op, ": argument '", arg, "' ", __VA_ARGS__)
