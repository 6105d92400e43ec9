//! Arbitrary descriptor tables and avail rings against the parser
//! and the whole queue loop.
use super::*;
use proptest::prelude::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;

const FUZZ_MEM: u64 = 0x20_0000;
/// Headers live here; descriptors pointing at them parse further.
const SLOTS: u64 = 0x10_0000;
const TABLE_LEN: u16 = 16;

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..4u64).prop_map(|k| SLOTS + k * 0x100),
        (0x1000..0xf_0000u64).prop_map(|o| SLOTS + o),
        (0..0x1000u64).prop_map(|o| FUZZ_MEM - o),
        (0..0x1_0000u64).prop_map(|o| FUZZ_MEM + o),
        // Never the rings below SLOTS: a device write there would
        // change the chains under the oracle.
        SLOTS..=u64::MAX,
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        0..32u32,
        (0..9u32).prop_map(|n| n * 512),
        0..0x4000u32,
        any::<u32>()
    ]
}

fn flags() -> impl Strategy<Value = u16> {
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    prop_oneof![
        4 => prop_oneof![Just(0), Just(next), Just(write), Just(next | write)],
        1 => Just(VRING_DESC_F_INDIRECT as u16),
        1 => any::<u16>(),
    ]
}

fn next() -> impl Strategy<Value = u16> {
    prop_oneof![4 => 0..TABLE_LEN, 1 => any::<u16>()]
}

fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (addr(), len(), flags(), next())
}

fn header() -> impl Strategy<Value = (u32, u64)> {
    let kind = prop_oneof![
        Just(VIRTIO_BLK_T_IN),
        Just(VIRTIO_BLK_T_OUT),
        Just(VIRTIO_BLK_T_FLUSH),
        Just(VIRTIO_BLK_T_GET_ID),
        any::<u32>(),
    ];
    (kind, prop_oneof![0..20u64, any::<u64>()])
}

#[derive(Debug)]
struct Case {
    table: Vec<(u64, u32, u16, u16)>,
    heads: Vec<u16>,
    avail_idx: Option<u16>,
    headers: Vec<(u32, u64)>,
}

/// A fully random table: mostly broken chains.
fn random_case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(descriptor(), 1..=TABLE_LEN as usize),
        prop::collection::vec(prop_oneof![4 => 0..TABLE_LEN, 1 => any::<u16>()], 0..8),
        prop::option::weighted(0.1, any::<u16>()),
        prop::collection::vec(header(), 4),
    )
        .prop_map(|(table, heads, avail_idx, headers)| Case {
            table,
            heads,
            avail_idx,
            headers,
        })
}

/// (addr, len, device-writable)
type Buf = (u64, u32, bool);

fn chain() -> impl Strategy<Value = Vec<Buf>> {
    let header = (
        prop_oneof![4 => (0..4u64).prop_map(|k| SLOTS + k * 0x100), 1 => addr()],
        prop_oneof![4 => Just(16u32), 1 => len()],
        prop::bool::weighted(0.1),
    );
    let data = (
        prop_oneof![4 => (0x1000..0xe_0000u64).prop_map(|o| SLOTS + o), 1 => addr()],
        prop_oneof![3 => (1..9u32).prop_map(|n| n * 512), 1 => len()],
        any::<bool>(),
    );
    let status = (
        prop_oneof![4 => (0..0x100u64).prop_map(|o| SLOTS + 0xf_0000 + o), 1 => addr()],
        prop_oneof![4 => Just(1u32), 1 => len()],
        prop::bool::weighted(0.9),
    );
    (header, prop::collection::vec(data, 0..4), status).prop_map(|(h, mut d, st)| {
        d.insert(0, h);
        d.push(st);
        d
    })
}

/// Well-formed-looking chains, then a few fields overwritten.
fn structured_case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(chain(), 1..4),
        prop::collection::vec((any::<prop::sample::Index>(), 0..4u8, any::<u64>()), 0..3),
        prop::collection::vec(header(), 4),
    )
        .prop_map(|(chains, mutations, headers)| {
            let mut table = Vec::new();
            let mut heads = Vec::new();
            for chain in chains {
                heads.push(table.len() as u16);
                let n = chain.len();
                for (i, (addr, len, write)) in chain.into_iter().enumerate() {
                    let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if i + 1 < n {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    table.push((addr, len, flags, table.len() as u16 + 1));
                }
            }
            for (index, field, value) in mutations {
                let at = index.index(table.len());
                let d = &mut table[at];
                match field {
                    0 => d.2 = value as u16,
                    1 => d.3 = value as u16,
                    2 => d.0 = value.max(SLOTS),
                    _ => d.1 = value as u32,
                }
            }
            Case {
                table,
                heads,
                avail_idx: None,
                headers,
            }
        })
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![1 => random_case(), 3 => structured_case()]
}

// Ring layout (the mock's overlaps its avail and used rings at
// large indices, so lay them out by hand).
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// Lays the case out in fresh guest memory.
fn setup(c: &Case) -> GuestMemory {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM as usize)]).unwrap();
    for (i, &(a, l, f, n)) in c.table.iter().enumerate() {
        let d = RawDescriptor::from(Descriptor::new(a, l, f, n));
        mem.write_obj(d, GuestAddress(DESC_TABLE + 16 * i as u64))
            .unwrap();
    }
    for (i, &h) in c.heads.iter().enumerate() {
        mem.write_obj(h, GuestAddress(AVAIL_RING + 4 + 2 * i as u64))
            .unwrap();
    }
    let idx = c.avail_idx.unwrap_or(c.heads.len() as u16);
    mem.write_obj(idx, GuestAddress(AVAIL_RING + 2)).unwrap();
    for (k, &(kind, sector)) in c.headers.iter().enumerate() {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(SLOTS + k as u64 * 0x100))
            .unwrap();
    }
    mem
}

/// A queue over the case's rings, as the transport would build it.
fn queue(mem: &GuestMemory) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// The device-writable bytes of each chain the device will pop, in order.
fn writable_sizes(mem: &GuestMemory) -> Vec<(u16, u64)> {
    let mut q = queue(mem);
    let mut out = Vec::new();
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let w = chain
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        // A head outside the table cannot be returned: the device
        // logs it and adds no used element.
        if head < QUEUE_SIZE {
            out.push((head, w));
        }
    }
    out
}

proptest! {
    #[test]
    fn parser_only_accepts_buffers_inside_memory(c in case()) {
        let mem = setup(&c);
        let mut q = queue(&mem);
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            match Request::parse(chain, &mem) {
                Ok(req) => {
                    prop_assert!(mem.check_range(req.status, 1));
                    for b in &req.data {
                        prop_assert!(mem.check_range(b.addr, b.len as usize));
                    }
                }
                Err(ParseError { status: Some(s), .. }) => {
                    prop_assert!(mem.check_range(s, 1));
                }
                Err(ParseError { status: None, .. }) => {}
            }
        }
    }

    #[test]
    fn process_queue_never_overstates_used_length(c in case()) {
        let mem = setup(&c);
        let expected = writable_sizes(&mem);
        let image = disk_image();
        let mut dev = block(&image, false, Some("fuzz"));
        let irq = test_utils::irq();
        let aq = ActiveQueue { queue: queue(&mem), notify: EventFd::new(EFD_NONBLOCK).unwrap() };
        dev.activate(mem.clone(), irq, vec![aq]).unwrap();
        dev.process_queue(0);

        let used_ring = GuestAddress(USED_RING);
        let used_idx: u16 = mem.read_obj(used_ring.unchecked_add(2)).unwrap();
        prop_assert_eq!(usize::from(used_idx), expected.len());
        for (i, &(head, writable)) in expected.iter().enumerate() {
            let at = used_ring.unchecked_add(4 + 8 * i as u64);
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
            prop_assert_eq!(id, u32::from(head));
            prop_assert!(u64::from(len) <= writable, "chain {} len {} > writable {}", i, len, writable);
        }
    }
}
