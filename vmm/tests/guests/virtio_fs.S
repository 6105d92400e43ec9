/*
 * Test guest: drives the virtio-fs device at the first virtio-mmio window
 * by hand: handshake, the config space (tag, request queue count), the
 * high-priority queue 0 and the request queue 1, DRIVER_OK. Then FUSE_INIT
 * on queue 1, answered by the vhost-user backend (virtiofsd): prints the
 * answer's error, unique and major version. Then it spins (~10 s in the
 * emulator, time for the test to kill the backend) and sends FUSE_GETATTR
 * on the root, printing the answer's error, unique and the used length.
 * Resets through the i8042.
 */
    .code64
    .text
    .globl _start
#include "virtio.inc"

#define VIRTIO_ID_FS    26
#define FUSE_GETATTR    3
#define FUSE_INIT       26
#define REQ1            BUFFERS
#define OUT1            (BUFFERS + 0x1000)
#define REQ2            (BUFFERS + 0x2000)
#define OUT2            (BUFFERS + 0x3000)

/* fuse_in_header at `at`: len, opcode, unique, nodeid (uid, gid, pid,
 * padding stay zero: the buffers start zeroed). */
.macro IN_HEADER at, len, opcode, unique, nodeid
    movl    $\len, \at
    movl    $\opcode, \at + 4
    movq    $\unique, \at + 8
    movq    $\nodeid, \at + 16
.endm

/* print_out: prints "error XXXXXXXX unique N" of the out header at %r12. */
print_out:
    PRINT   " error "
    mov     4(%r12), %eax
    call    put_hex32
    PRINT   " unique "
    mov     8(%r12), %eax
    call    put_dec
    ret

_start:
    call    map_mmio
    mov     $VIRTIO_MMIO_BASE, %ebx
    mov     $VIRTIO_ID_FS, %edi
    call    virtio_init

    /* struct virtio_fs_config: u8 tag[36], le32 num_request_queues. */
    PRINT   "tag "
    xor     %r12d, %r12d
1:  movzbl  MMIO_CONFIG(%rbx, %r12), %eax
    test    %al, %al
    jz      2f
    mov     $COM1, %dx
    outb    %al, %dx
    inc     %r12d
    cmp     $36, %r12d
    jb      1b
2:  PRINT   "\nrequest queues "
    MMIO_READ MMIO_CONFIG + 36
    call    put_dec
    PRINT   "\n"

    xor     %ecx, %ecx
    mov     $QUEUE0, %edx
    call    setup_queue
    mov     $1, %ecx
    mov     $QUEUE1, %edx
    call    setup_queue
    call    driver_ok

    /* FUSE_INIT 7.31: fuse_in_header + major, minor, max_readahead, flags. */
    IN_HEADER REQ1, 56, FUSE_INIT, 1, 0
    movl    $7, REQ1 + 40
    movl    $31, REQ1 + 44
    DESC    QUEUE1, 0, REQ1, 56, DESC_F_NEXT, 1
    DESC    QUEUE1, 1, OUT1, 256, DESC_F_WRITE, 0
    MAKE_AVAIL QUEUE1, 0, 0
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $1
    WAIT_USED QUEUE1, 1, "the FUSE_INIT answer"
    PRINT   "init"
    mov     $OUT1, %r12d
    call    print_out
    PRINT   " major "
    mov     OUT1 + 16, %eax
    call    put_dec
    PRINT   "\n"

    /* Give the test time to kill the backend. */
    mov     $POLL_LIMIT, %ecx
3:  dec     %ecx
    jnz     3b

    /* FUSE_GETATTR on the root (nodeid 1): fuse_getattr_in is 16 bytes. */
    IN_HEADER REQ2, 56, FUSE_GETATTR, 2, 1
    DESC    QUEUE1, 2, REQ2, 56, DESC_F_NEXT, 3
    DESC    QUEUE1, 3, OUT2, 256, DESC_F_WRITE, 0
    MAKE_AVAIL QUEUE1, 1, 2
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $1
    WAIT_USED QUEUE1, 2, "the FUSE_GETATTR answer"
    PRINT   "getattr"
    mov     $OUT2, %r12d
    call    print_out
    PRINT   " len "
    mov     QUEUE1 + RING_USED + 4 + 8 + 4, %eax    /* used.ring[1].len */
    call    put_dec
    PRINT   "\n"
    jmp     reset
