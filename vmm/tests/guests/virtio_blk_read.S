/*
 * Test guest: drives the virtio-blk device at the first virtio-mmio window
 * by hand (handshake, queue 0, DRIVER_OK), reads sector 0 and prints its
 * first 16 bytes in hex, then resets through the i8042. Entered in 64-bit
 * mode at 1 MiB like hello_reset.
 */
    .code64
    .text
    .globl _start
#include "virtio.inc"
#include "virtio_blk.inc"

_start:
    call    blk_bringup
    xor     %ecx, %ecx
    call    blk_read_and_dump
    jmp     reset
