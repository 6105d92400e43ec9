/*
 * Test guest: brings up the virtio-blk device like virtio_blk_read, writes
 * sector 1 with the pattern byte[i] = (7 * i + 0x11) & 0xff, prints the
 * request's status and resets through the i8042. The test checks the
 * pattern in the host file.
 */
    .code64
    .text
    .globl _start
#include "virtio.inc"
#include "virtio_blk.inc"

_start:
    call    blk_bringup

    xor     %ecx, %ecx
1:  imul    $7, %ecx, %eax
    add     $0x11, %eax
    mov     %al, BLK_DATA(%ecx)
    inc     %ecx
    cmp     $SECTOR_SIZE, %ecx
    jb      1b

    PRINT   "write sector 1\n"
    mov     $BLK_T_OUT, %eax
    mov     $1, %ecx
    xor     %edx, %edx
    call    blk_request
    jmp     reset
