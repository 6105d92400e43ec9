/*
 * Test guest: drives the virtio-vsock device at the first virtio-mmio
 * window by hand. It sets up the rx, tx and event queues, lends the device
 * four rx buffers, connects to host port 5000 from guest port 1234
 * (OP_REQUEST), waits for the OP_RESPONSE, then prints the first data
 * packet the host sends and answers "pong\n" before resetting through the
 * i8042. Entered in 64-bit mode at 1 MiB like hello_reset.
 */
    .code64
    .text
    .globl _start
#include "virtio.inc"

#define VIRTIO_ID_VSOCK 19
#define RXQ             QUEUE0
#define TXQ             QUEUE1
#define EVQ             QUEUE2

#define HOST_CID        2
#define GUEST_CID       3
#define GUEST_PORT      1234
#define HOST_PORT       5000
#define TYPE_STREAM     1
#define OP_REQUEST      1
#define OP_RESPONSE     2
#define OP_RW           5
#define BUF_ALLOC       0x10000

/* struct virtio_vsock_hdr (44 bytes, little endian). */
#define HDR_SIZE        44
#define HDR_SRC_CID     0
#define HDR_DST_CID     8
#define HDR_SRC_PORT    16
#define HDR_DST_PORT    20
#define HDR_LEN         24
#define HDR_TYPE        28
#define HDR_OP          30
#define HDR_FLAGS       32
#define HDR_BUF_ALLOC   36
#define HDR_FWD_CNT     40

/* Four 4 KiB rx buffers (buffer i is rx descriptor i), then tx packets. */
#define RX_BUFS         4
#define RX_BUF_SIZE     0x1000
#define TX_REQUEST      (BUFFERS + 0x8000)
#define TX_RW           (BUFFERS + 0x8100)
#define TX_DATA         (BUFFERS + 0x8200)

/* Writes a guest-to-host stream header at `at`. */
.macro VSOCK_HDR at, op, len
    movq    $GUEST_CID, \at + HDR_SRC_CID
    movq    $HOST_CID, \at + HDR_DST_CID
    movl    $GUEST_PORT, \at + HDR_SRC_PORT
    movl    $HOST_PORT, \at + HDR_DST_PORT
    movl    $\len, \at + HDR_LEN
    movw    $TYPE_STREAM, \at + HDR_TYPE
    movw    $\op, \at + HDR_OP
    movl    $0, \at + HDR_FLAGS
    movl    $BUF_ALLOC, \at + HDR_BUF_ALLOC
    movl    $0, \at + HDR_FWD_CNT
.endm

/* Checks header field `field` (operand size `size`: q, l or w) of the
 * packet at %rsi. */
.macro CHECK_FIELD size, field, value, msg
    cmp\size $\value, \field(%rsi)
    je      .Lok\@
    PRINT   "FAIL: \msg\n"
    jmp     reset
.Lok\@:
.endm

_start:
    call    map_mmio
    mov     $VIRTIO_MMIO_BASE, %ebx
    mov     $VIRTIO_ID_VSOCK, %edi
    call    virtio_init

    /* virtio_vsock_config.guest_cid (le64; ours fits 32 bits). */
    PRINT   "guest_cid "
    MMIO_READ MMIO_CONFIG
    call    put_dec
    PRINT   "\n"

    xor     %ecx, %ecx
    mov     $RXQ, %edx
    call    setup_queue
    mov     $1, %ecx
    mov     $TXQ, %edx
    call    setup_queue
    mov     $2, %ecx
    mov     $EVQ, %edx
    call    setup_queue
    call    driver_ok

    /* Lend the device the rx buffers: descriptor i -> buffer i. */
    DESC    RXQ, 0, (BUFFERS + 0 * RX_BUF_SIZE), RX_BUF_SIZE, DESC_F_WRITE, 0
    DESC    RXQ, 1, (BUFFERS + 1 * RX_BUF_SIZE), RX_BUF_SIZE, DESC_F_WRITE, 0
    DESC    RXQ, 2, (BUFFERS + 2 * RX_BUF_SIZE), RX_BUF_SIZE, DESC_F_WRITE, 0
    DESC    RXQ, 3, (BUFFERS + 3 * RX_BUF_SIZE), RX_BUF_SIZE, DESC_F_WRITE, 0
    MAKE_AVAIL RXQ, 0, 0
    MAKE_AVAIL RXQ, 1, 1
    MAKE_AVAIL RXQ, 2, 2
    MAKE_AVAIL RXQ, 3, 3
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $0
    PRINT   "rx buffers posted\n"

    /* Connect: OP_REQUEST, a lone header. */
    VSOCK_HDR TX_REQUEST, OP_REQUEST, 0
    DESC    TXQ, 0, TX_REQUEST, HDR_SIZE, 0, 0
    MAKE_AVAIL TXQ, 0, 0
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $1
    PRINT   "request sent\n"

    /* The first rx packet must be the host's OP_RESPONSE. */
    xor     %r12d, %r12d            /* rx used entries consumed */
    WAIT_USED RXQ, 1, "the connection response"
    call    next_rx_packet
    CHECK_FIELD w, HDR_OP, OP_RESPONSE, "first rx packet is not OP_RESPONSE"
    CHECK_FIELD q, HDR_SRC_CID, HOST_CID, "response src_cid"
    CHECK_FIELD q, HDR_DST_CID, GUEST_CID, "response dst_cid"
    CHECK_FIELD l, HDR_SRC_PORT, HOST_PORT, "response src_port"
    CHECK_FIELD l, HDR_DST_PORT, GUEST_PORT, "response dst_port"
    CHECK_FIELD w, HDR_TYPE, TYPE_STREAM, "response type"
    PRINT   "vsock connected\n"

    /* Wait for data from the host, skipping control packets (e.g. credit
     * updates) that may come first. */
1:  cmp     $RX_BUFS, %r12d
    CHECK   b, "out of rx buffers before any data"
    mov     $POLL_LIMIT, %ecx
2:  movzwl  RXQ + RING_USED + 2, %eax
    cmp     %r12d, %eax
    ja      3f
    dec     %ecx
    jnz     2b
    PRINT   "FAIL: timeout waiting for data from the host\n"
    jmp     reset
3:  call    next_rx_packet
    cmpw    $OP_RW, HDR_OP(%rsi)
    jne     1b

    /* Print the payload as text (the test sends a short line). */
    mov     %rsi, %r13              /* PRINT clobbers %rsi */
    PRINT   "received: "
    mov     HDR_LEN(%r13), %ecx
    lea     HDR_SIZE(%r13), %rsi
    mov     $COM1, %dx
4:  test    %ecx, %ecx
    jz      5f
    lodsb
    outb    %al, %dx
    dec     %ecx
    jmp     4b
5:
    /* Answer with an OP_RW of "pong\n": header and payload in two
     * chained descriptors. */
    VSOCK_HDR TX_RW, OP_RW, 5
    movl    $0x676e6f70, TX_DATA    /* "pong" */
    movb    $'\n', TX_DATA + 4
    DESC    TXQ, 1, TX_RW, HDR_SIZE, DESC_F_NEXT, 2
    DESC    TXQ, 2, TX_DATA, 5, 0, 0
    MAKE_AVAIL TXQ, 1, 1
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $1
    WAIT_USED TXQ, 2, "the device to take the data"
    PRINT   "sent pong\n"
    jmp     reset

/*
 * next_rx_packet: points %rsi at the rx buffer of used entry %r12d and
 * counts it consumed.
 */
next_rx_packet:
    mov     %r12d, %eax
    and     $(QSIZE - 1), %eax
    mov     RXQ + RING_USED + 4(, %rax, 8), %eax    /* used.ring[i].id */
    cmp     $RX_BUFS, %eax
    CHECK   b, "used id is not an rx buffer"
    shl     $12, %eax               /* * RX_BUF_SIZE */
    lea     BUFFERS(%rax), %rsi
    inc     %r12d
    ret
