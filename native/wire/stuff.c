/* stuff.c - outbound dot-stuffing; see stuff.h. */
#include "stuff.h"
