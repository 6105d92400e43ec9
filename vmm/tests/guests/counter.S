/*
 * Test guest for snapshots: counts in %rbx and in memory at 0x50000,
 * checks on every round that the two agree, and prints "t" on COM1 every
 * 65536 rounds ("S" once at the start). A VM restored without its
 * registers or memory prints "M" (mismatch) and resets; one that booted
 * again prints "S".
 */
    .code64
    .text
    .globl _start
_start:
    xor     %ebx, %ebx
    movq    %rbx, 0x50000
    mov     $0x3f8, %dx
    mov     $'S', %al
    outb    %al, %dx
1:  cmpq    0x50000, %rbx
    jne     2f
    inc     %rbx
    movq    %rbx, 0x50000
    test    $0xffff, %ebx
    jnz     1b
    mov     $'t', %al
    outb    %al, %dx
    jmp     1b
2:  mov     $'M', %al
    outb    %al, %dx
    mov     $0xfe, %al
    outb    %al, $0x64
    cli
3:  hlt
    jmp     3b
