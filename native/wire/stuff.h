/*
 * stuff.h - outbound SMTP content transformation (RFC 5321 4.5.2).
 * (Placeholder declarations; implemented in stuff.c.)
 */
#ifndef MTA_WIRE_STUFF_H
#define MTA_WIRE_STUFF_H
#include <stddef.h>
#endif
