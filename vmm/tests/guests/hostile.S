/*
 * Test guest: a hostile guest kernel. For ROUNDS rounds, on every
 * virtio-mmio window: garbage to every register and the config space, at
 * every width; a handshake, then descriptor chains that loop, overlap,
 * point outside guest memory or wrap around the address space, heads and
 * next indexes out of the table, an indirect table outside memory, a bogus
 * available index; and queues whose rings lie outside memory. Windows with
 * no device get reads and writes too. Then garbage to the UART's
 * registers, and FLOOD_BYTES of garbage to its transmit register (with a
 * bad register read every 4 KiB of it). Prints
 * "hostile: ..." lines as it goes (the last ones may be dropped by the
 * console's limits), then idles with interrupts off: only the VMM can end
 * the VM.
 */
    .code64
    .text
    .globl _start
#include "virtio.inc"

#define WINDOW          0x1000
#define WINDOWS         19
#define ROUNDS          8
#ifndef FLOOD_BYTES                     /* cc -DFLOOD_BYTES=... for more */
#define FLOOD_BYTES     (256 * 1024)
#endif
#define OUTSIDE_RAM     0x7ff00000      /* below the MMIO windows, past RAM */
#define DESC_F_INDIRECT 4

/* %rax = the next value of the xorshift64 generator in %r14. */
.macro RAND
    mov     %r14, %rax
    shl     $13, %rax
    xor     %rax, %r14
    mov     %r14, %rax
    shr     $7, %rax
    xor     %rax, %r14
    mov     %r14, %rax
    shl     $17, %rax
    xor     %rax, %r14
    mov     %r14, %rax
.endm

_start:
    call    map_mmio
    mov     $0x9e3779b97f4a7c15, %r14
    PRINT   "hostile: start\n"
    xor     %r13d, %r13d            /* round */
1:  mov     $VIRTIO_MMIO_BASE, %ebx
    xor     %r12d, %r12d            /* window */
2:  MMIO_READ MMIO_MAGIC
    cmp     $MAGIC_VIRT, %eax
    jne     3f
    call    garbage_registers
    call    bad_chains
    call    bad_rings
    jmp     4f
3:  RAND                            /* no device here */
    mov     %eax, MMIO_STATUS(%rbx)
    mov     %eax, MMIO_QUEUE_NOTIFY(%rbx)
4:  add     $WINDOW, %ebx
    inc     %r12d
    cmp     $WINDOWS, %r12d
    jb      2b
    PRINT   "hostile: round done\n"
    inc     %r13d
    cmp     $ROUNDS, %r13d
    jb      1b
    PRINT   "hostile: devices done\n"
    call    uart_garbage
    call    flood
    PRINT   "hostile: flood done\n"
    cli
5:  hlt
    jmp     5b

/* garbage_registers: every register of the device at %rbx, at every width. */
garbage_registers:
    xor     %ecx, %ecx              /* register offset */
1:  RAND
    mov     %eax, (%rbx,%rcx)
    mov     (%rbx,%rcx), %edx
    mov     %al, 1(%rbx,%rcx)
    mov     %ax, 2(%rbx,%rcx)
    mov     %rax, (%rbx,%rcx)
    movzbl  3(%rbx,%rcx), %edx
    add     $4, %ecx
    cmp     $0x200, %ecx
    jb      1b
    MMIO_WRITE MMIO_STATUS, $0
    ret

/* handshake: reset, VIRTIO_F_VERSION_1 only, FEATURES_OK; no checks. */
handshake:
    MMIO_WRITE MMIO_STATUS, $0
    MMIO_WRITE MMIO_STATUS, $S_ACKNOWLEDGE
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER)
    MMIO_WRITE MMIO_DRIVER_FEATURES_SEL, $0
    MMIO_WRITE MMIO_DRIVER_FEATURES, $0
    MMIO_WRITE MMIO_DRIVER_FEATURES_SEL, $1
    MMIO_WRITE MMIO_DRIVER_FEATURES, $1
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
    ret

/* queue: queue %ecx of QSIZE entries in the area at %edx, rings zeroed. */
queue:
    movl    $0, RING_AVAIL(%rdx)
    movl    $0, RING_USED(%rdx)
    MMIO_WRITE MMIO_QUEUE_SEL, %ecx
    MMIO_WRITE MMIO_QUEUE_NUM, $QSIZE
    MMIO_WRITE MMIO_QUEUE_DESC_LOW, %edx
    MMIO_WRITE MMIO_QUEUE_DESC_HIGH, $0
    lea     RING_AVAIL(%rdx), %eax
    MMIO_WRITE MMIO_QUEUE_AVAIL_LOW, %eax
    MMIO_WRITE MMIO_QUEUE_AVAIL_HIGH, $0
    lea     RING_USED(%rdx), %eax
    MMIO_WRITE MMIO_QUEUE_USED_LOW, %eax
    MMIO_WRITE MMIO_QUEUE_USED_HIGH, $0
    MMIO_WRITE MMIO_QUEUE_READY, $1
    ret

/* bad_chains: a live device whose queues 0 and 1 hold only bad chains. */
bad_chains:
    call    handshake
    xor     %ecx, %ecx
    mov     $QUEUE0, %edx
    call    queue
    mov     $1, %ecx
    mov     $QUEUE1, %edx
    call    queue
    mov     $2, %ecx                /* vsock and a reporting balloon have 3 */
    mov     $QUEUE2, %edx
    call    queue
    /* A loop, overlapping buffers, outside RAM, wrapping past 2^64, a next
     * index out of the table, a 4 GiB length, an indirect table outside RAM. */
    DESC    QUEUE0, 0, BUFFERS, 64, DESC_F_NEXT, 0
    DESC    QUEUE0, 1, BUFFERS, 0x1000, DESC_F_NEXT, 2
    DESC    QUEUE0, 2, BUFFERS + 8, 0x1000, DESC_F_WRITE, 0
    DESC    QUEUE0, 3, OUTSIDE_RAM, 0x1000, DESC_F_WRITE, 0
    DESC    QUEUE0, 4, -0x1000, 0x2000, DESC_F_WRITE, 0
    DESC    QUEUE0, 5, BUFFERS, 16, DESC_F_NEXT, 200
    DESC    QUEUE0, 6, BUFFERS, 0xffffffff, DESC_F_WRITE, 0
    DESC    QUEUE0, 7, OUTSIDE_RAM, 0x100, DESC_F_INDIRECT, 0
    /* Queue 1 shares the table's shape: copy it. */
    mov     $QUEUE0, %esi
    mov     $QUEUE1, %edi
    mov     $(QSIZE * DESC_SIZE), %ecx
    rep movsb
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
    /* Every head, then one out of the table. */
    xor     %ecx, %ecx
3:  mov     %cx, QUEUE0 + RING_AVAIL + 4(,%rcx,2)
    mov     %cx, QUEUE1 + RING_AVAIL + 4(,%rcx,2)
    inc     %ecx
    cmp     $QSIZE, %ecx
    jb      3b
    movw    $200, QUEUE0 + RING_AVAIL + 4 + 7 * 2
    movw    $QSIZE, QUEUE0 + RING_AVAIL + 2
    movw    $QSIZE, QUEUE1 + RING_AVAIL + 2
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $0
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $1
    /* Give the device a moment (it works on another thread) to take them:
     * until a used index moves, or about 0.3 s in the emulator. */
    mov     $100000, %ecx
1:  movzwl  QUEUE0 + RING_USED + 2, %eax
    or      QUEUE1 + RING_USED + 2, %ax
    jnz     2f
    pause
    dec     %ecx
    jnz     1b
2:
    /* Then an available index far past the ring. */
    movw    $(QSIZE + 1000), QUEUE0 + RING_AVAIL + 2
    movw    $0xfff0, QUEUE1 + RING_AVAIL + 2
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $0
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $1
    /* Notifies for queues the device does not have. */
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $7
    MMIO_WRITE MMIO_QUEUE_NOTIFY, $0x10000
    ret

/* bad_rings: a queue whose rings lie outside RAM and whose size is not a
 * power of two, then DRIVER_OK; then a reset. */
bad_rings:
    call    handshake
    MMIO_WRITE MMIO_QUEUE_SEL, $0
    MMIO_WRITE MMIO_QUEUE_NUM, $3
    MMIO_WRITE MMIO_QUEUE_DESC_LOW, $0xfffff000
    MMIO_WRITE MMIO_QUEUE_DESC_HIGH, $0xffffffff
    MMIO_WRITE MMIO_QUEUE_AVAIL_LOW, $OUTSIDE_RAM
    MMIO_WRITE MMIO_QUEUE_AVAIL_HIGH, $0
    MMIO_WRITE MMIO_QUEUE_USED_LOW, $OUTSIDE_RAM
    MMIO_WRITE MMIO_QUEUE_USED_HIGH, $0
    MMIO_WRITE MMIO_QUEUE_READY, $1
    MMIO_WRITE MMIO_STATUS, $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
    MMIO_WRITE MMIO_STATUS, $0
    ret

/* uart_garbage: garbage to the UART's registers, then 8N1, no loopback. */
uart_garbage:
    mov     $256, %ecx
1:  RAND
    mov     $(COM1 + 1), %dx
2:  outb    %al, %dx
    inb     %dx, %al
    ror     $8, %rax
    inc     %dx
    cmp     $(COM1 + 8), %dx
    jb      2b
    dec     %ecx
    jnz     1b
    mov     $(COM1 + 3), %dx        /* LCR: 8N1, divisor latch off */
    mov     $3, %al
    outb    %al, %dx
    mov     $(COM1 + 4), %dx        /* MCR: DTR, RTS, OUT2; no loopback */
    mov     $0x0b, %al
    outb    %al, %dx
    mov     $(COM1 + 1), %dx        /* IER: no interrupts */
    xor     %eax, %eax
    outb    %al, %dx
    ret

/* flood: FLOOD_BYTES of garbage to COM1's transmit register, and a bad
 * register access every 4 KiB of it, so the register faults last as long. */
flood:
    mov     $FLOOD_BYTES, %ecx
    mov     $COM1, %dx
1:  RAND
    outb    %al, %dx
    test    $0xfff, %ecx
    jnz     2f
    mov     $VIRTIO_MMIO_BASE, %esi
    movzbl  1(%rsi), %eax
2:  dec     %ecx
    jnz     1b
    ret
