/*
 * Test guest: prints the kernel command line from the zero page (%rsi at
 * entry), then the device type in each virtio-mmio window from 0xd000_0000
 * upward until a window's magic is not "virt", and that magic. Resets
 * through the i8042.
 */
    .code64
    .text
    .globl _start
#include "virtio.inc"

#define VIRTIO_WINDOW   0x1000
#define ZP_CMD_LINE_PTR 0x228           /* boot_params.hdr.cmd_line_ptr */

_start:
    mov     ZP_CMD_LINE_PTR(%rsi), %r12d
    PRINT   "cmdline: "
    mov     %r12, %rsi
    call    puts
    PRINT   "\n"

    call    map_mmio
    mov     $VIRTIO_MMIO_BASE, %ebx
    xor     %r12d, %r12d            /* window number */
1:  PRINT   "window "
    mov     %r12d, %eax
    call    put_dec
    MMIO_READ MMIO_MAGIC
    cmp     $MAGIC_VIRT, %eax
    jne     2f
    PRINT   ": device "
    MMIO_READ MMIO_DEVICE_ID
    call    put_dec
    PRINT   "\n"
    add     $VIRTIO_WINDOW, %ebx
    inc     %r12d
    cmp     $32, %r12d              /* more than the VMM's 19 devices */
    jb      1b
    PRINT   "FAIL: no end of the windows\n"
    jmp     reset

2:  PRINT   ": magic "
    MMIO_READ MMIO_MAGIC
    call    put_hex32
    PRINT   "\n"
    jmp     reset
