/*
 * Test guest: a clumsy virtio-blk driver. It first gets the handshake
 * wrong twice (no VIRTIO_F_VERSION_1, then DRIVER_OK without a queue),
 * printing the device status after each step, then loads properly, reads
 * sector 0, and loads a second time over the active device (reset, new
 * handshake, same ring addresses) and reads sector 2. Resets through the
 * i8042 at the end.
 */
    .code64
    .text
    .globl _start
#include "virtio.inc"
#include "virtio_blk.inc"

#define MMIO_INTERRUPT_STATUS   0x060
#define MMIO_INTERRUPT_ACK      0x064

_start:
    call    map_mmio
    mov     $VIRTIO_MMIO_BASE, %ebx

    /* Features without VIRTIO_F_VERSION_1: FEATURES_OK must not stick. */
    PRINT   "without VERSION_1\n"
    MMIO_WRITE MMIO_STATUS, $0
    MMIO_WRITE MMIO_STATUS, $S_ACKNOWLEDGE
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER)
    MMIO_WRITE MMIO_DRIVER_FEATURES_SEL, $0
    MMIO_WRITE MMIO_DRIVER_FEATURES, $0
    MMIO_WRITE MMIO_DRIVER_FEATURES_SEL, $1
    MMIO_WRITE MMIO_DRIVER_FEATURES, $0
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
    call    print_status
    /* A notify long before DRIVER_OK must do no harm. */
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $0

    /* Reset, then DRIVER_OK with no queue set up: the device needs a reset
     * and raises a config interrupt. */
    PRINT   "without queues\n"
    MMIO_WRITE MMIO_STATUS, $0
    call    print_status
    MMIO_WRITE MMIO_STATUS, $S_ACKNOWLEDGE
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER)
    MMIO_WRITE MMIO_DRIVER_FEATURES_SEL, $1
    MMIO_WRITE MMIO_DRIVER_FEATURES, $1
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
    call    print_status
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
    call    print_status
    PRINT   "interrupt status "
    MMIO_READ MMIO_INTERRUPT_STATUS
    call    put_dec
    PRINT   "\n"
    MMIO_WRITE MMIO_INTERRUPT_ACK, $2

    /* A proper load (virtio_init starts with a reset). */
    PRINT   "first driver\n"
    call    blk_bringup
    xor     %ecx, %ecx
    call    blk_read_and_dump

    /* Load again over the active device. */
    PRINT   "second driver\n"
    call    blk_bringup
    mov     $2, %ecx
    call    blk_read_and_dump
    jmp     reset
