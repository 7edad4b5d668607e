"""Channel I/O and the virtio-ccw transport as the s390 architecture and the virtio spec fix
them (virtio spec 4.3 "Virtio Over Channel I/O"; the channel subsystem of the z/Architecture
Principles of Operation, as Linux's arch/s390/include/asm/cio.h, scsw.h, orb.h and QEMU's
include/hw/s390x/ioinst.h spell it).

Byte order. s390 is big-endian, and so is everything the channel subsystem and virtio-ccw move
between driver and device: CCWs, ORBs, SCHIBs, IRBs, SENSE ID data and the virtio-ccw
communication blocks (vq_info_block, vq_config_block, virtio_thinint_area, virtio_rev_info,
indicator addresses). vmsim keeps that wire format: every structure below is a `struct` format
with ">" (the one exception the spec makes: virtio_feature_desc.features is le32). What virtio
itself fixes keeps virtio's rules: config space and the rings are little-endian because vmsim
drives only revision >= 1 (VERSION_1) devices; revision 0 (legacy, native = big-endian rings on
s390) is rejected as a non-transitional device must.

Indicators are bits in guest memory that both sides touch concurrently, so they are never read
or written with `struct` (DESIGN.md): each side reaches them with single aligned native loads
and stores and works out where a bit lies in the native value itself:

- a classic indicator (SET_IND, SET_CONF_IND) is a big-endian 64-bit word whose value bit n
  stands for queue n (bit 0 of SET_CONF_IND's word: a configuration change);
- adapter indicators (SET_IND_ADAPTER) are numbered from the left: bit n is the bit
  0x80 >> (n % 8) of byte n // 8 of the area; the summary indicator is one byte.
"""

import struct

# ---- channel command words (format 1) ------------------------------------------------------------
CCW1 = struct.Struct(">BBHI")           # cmd_code, flags, count, cda (31-bit)
CCW_SIZE = CCW1.size                    # 8; a channel program is doubleword aligned

CCW_FLAG_DC = 0x80                      # data chaining
CCW_FLAG_CC = 0x40                      # command chaining
CCW_FLAG_SLI = 0x20                     # suppress length indication
CCW_FLAG_SKIP = 0x10                    # skip data transfer
CCW_FLAG_PCI = 0x08                     # program-controlled interruption
CCW_FLAG_IDA = 0x04                     # indirect data addressing
CCW_FLAG_SUSPEND = 0x02
CCW_FLAG_MIDA = 0x01

CDA_MAX = 0x7FFF_FFFF                   # format-1 CCWs address 31 bits

# basic channel commands every virtio-ccw proxy answers (spec 4.3.1)
CCW_CMD_NOOP = 0x03
CCW_CMD_BASIC_SENSE = 0x04
CCW_CMD_TIC = 0x08                      # transfer in channel
CCW_CMD_SENSE_ID = 0xE4

# virtio-ccw commands (spec 4.3.1.1)
CCW_CMD_SET_VQ = 0x13
CCW_CMD_VDEV_RESET = 0x33
CCW_CMD_SET_IND = 0x43
CCW_CMD_SET_CONF_IND = 0x53
CCW_CMD_SET_IND_ADAPTER = 0x73
CCW_CMD_READ_FEAT = 0x12
CCW_CMD_WRITE_FEAT = 0x11
CCW_CMD_READ_CONF = 0x22
CCW_CMD_WRITE_CONF = 0x21
CCW_CMD_WRITE_STATUS = 0x31
CCW_CMD_READ_VQ_CONF = 0x32
CCW_CMD_SET_VIRTIO_REV = 0x83
CCW_CMD_READ_STATUS = 0x72

VIRTIO_COMMANDS = frozenset({
    CCW_CMD_SET_VQ, CCW_CMD_VDEV_RESET, CCW_CMD_SET_IND, CCW_CMD_SET_CONF_IND,
    CCW_CMD_SET_IND_ADAPTER, CCW_CMD_READ_FEAT, CCW_CMD_WRITE_FEAT, CCW_CMD_READ_CONF,
    CCW_CMD_WRITE_CONF, CCW_CMD_WRITE_STATUS, CCW_CMD_READ_VQ_CONF, CCW_CMD_SET_VIRTIO_REV,
    CCW_CMD_READ_STATUS,
})

COMMAND_NAMES = {
    CCW_CMD_NOOP: "NOOP", CCW_CMD_BASIC_SENSE: "BASIC_SENSE", CCW_CMD_TIC: "TIC",
    CCW_CMD_SENSE_ID: "SENSE_ID", CCW_CMD_SET_VQ: "SET_VQ", CCW_CMD_VDEV_RESET: "VDEV_RESET",
    CCW_CMD_SET_IND: "SET_IND", CCW_CMD_SET_CONF_IND: "SET_CONF_IND",
    CCW_CMD_SET_IND_ADAPTER: "SET_IND_ADAPTER", CCW_CMD_READ_FEAT: "READ_FEAT",
    CCW_CMD_WRITE_FEAT: "WRITE_FEAT", CCW_CMD_READ_CONF: "READ_CONF",
    CCW_CMD_WRITE_CONF: "WRITE_CONF", CCW_CMD_WRITE_STATUS: "WRITE_STATUS",
    CCW_CMD_READ_VQ_CONF: "READ_VQ_CONF", CCW_CMD_SET_VIRTIO_REV: "SET_VIRTIO_REV",
    CCW_CMD_READ_STATUS: "READ_STATUS",
}

# ---- operation request block (command mode) ------------------------------------------------------
ORB = struct.Struct(">IHBBI")           # intparm, ctrl0, lpm, ctrl1, cpa
ORB_SIZE = ORB.size                     # 12: the words a command-mode ORB is read for
ORB_CTRL0_KEY = 0xF000
ORB_CTRL0_SPND = 0x0800                 # suspend control
ORB_CTRL0_STR = 0x0400                  # streaming mode
ORB_CTRL0_MOD = 0x0200
ORB_CTRL0_SYNC = 0x0100
ORB_CTRL0_FMT = 0x0080                  # format-1 CCWs
ORB_CTRL0_PFCH = 0x0040
ORB_CTRL0_ISIC = 0x0020
ORB_CTRL0_ALCC = 0x0010
ORB_CTRL0_SSIC = 0x0008
ORB_CTRL0_C64 = 0x0002
ORB_CTRL0_I2K = 0x0001
ORB_CTRL0_INVALID = 0x0004
ORB_CTRL1_ILS = 0x80
ORB_CTRL1_MIDAW = 0x40
ORB_CTRL1_ORBX = 0x01
ORB_CTRL1_INVALID = 0x3E

# ---- subchannel status word (command mode) -------------------------------------------------------
SCSW = struct.Struct(">HHIBBH")         # flags, ctrl, cpa, dstat, cstat, count
SCSW_FLAGS_KEY = 0xF000
SCSW_FLAGS_SCTL = 0x0800
SCSW_FLAGS_ESWF = 0x0400                # extended status word format
SCSW_FLAGS_CC = 0x0300                  # deferred condition code
SCSW_FLAGS_CC_SHIFT = 8
SCSW_FLAGS_FMT = 0x0080
SCSW_FLAGS_PFCH = 0x0040
SCSW_FLAGS_ISIC = 0x0020
SCSW_FLAGS_ALCC = 0x0010
SCSW_FLAGS_SSI = 0x0008
SCSW_FLAGS_ZCC = 0x0004
SCSW_FLAGS_ECTL = 0x0002                # extended control: ecw holds sense data
SCSW_FLAGS_PNO = 0x0001

SCSW_CTRL_FCTL = 0x7000                 # function control
SCSW_CTRL_ACTL = 0x0FE0                 # activity control
SCSW_CTRL_STCTL = 0x001F                # status control

SCSW_FCTL_CLEAR_FUNC = 0x1000
SCSW_FCTL_HALT_FUNC = 0x2000
SCSW_FCTL_START_FUNC = 0x4000

SCSW_ACTL_SUSP = 0x0020
SCSW_ACTL_DEVICE_ACTIVE = 0x0040
SCSW_ACTL_SUBCH_ACTIVE = 0x0080
SCSW_ACTL_CLEAR_PEND = 0x0100
SCSW_ACTL_HALT_PEND = 0x0200
SCSW_ACTL_START_PEND = 0x0400
SCSW_ACTL_RESUME_PEND = 0x0800

SCSW_STCTL_STATUS_PEND = 0x0001
SCSW_STCTL_SECONDARY = 0x0002
SCSW_STCTL_PRIMARY = 0x0004
SCSW_STCTL_INTERMEDIATE = 0x0008
SCSW_STCTL_ALERT = 0x0010

# device status
DEV_STAT_ATTENTION = 0x80
DEV_STAT_STAT_MOD = 0x40
DEV_STAT_CU_END = 0x20
DEV_STAT_BUSY = 0x10
DEV_STAT_CHN_END = 0x08
DEV_STAT_DEV_END = 0x04
DEV_STAT_UNIT_CHECK = 0x02
DEV_STAT_UNIT_EXCEP = 0x01

# subchannel (channel) status
SCHN_STAT_PCI = 0x80
SCHN_STAT_INCORR_LEN = 0x40
SCHN_STAT_PROG_CHECK = 0x20
SCHN_STAT_PROT_CHECK = 0x10
SCHN_STAT_CHN_DATA_CHK = 0x08
SCHN_STAT_CHN_CTRL_CHK = 0x04
SCHN_STAT_INTF_CTRL_CHK = 0x02
SCHN_STAT_CHAIN_CHECK = 0x01

# sense byte 0
SNS0_CMD_REJECT = 0x80
SNS0_INTERVENTION_REQ = 0x40
SNS0_BUS_OUT_CHECK = 0x20
SNS0_EQUIPMENT_CHECK = 0x10
SNS0_DATA_CHECK = 0x08
SENSE_DATA_SIZE = 32                    # BASIC SENSE / the IRB's ecw

# ---- path management control word and subchannel information block -------------------------------
PMCW = struct.Struct(">IHHBBBBHBB8sI")  # intparm, flags, devno, lpm, pnom, lpum, pim, mbi,
#                                         pom, pam, chpid[8], chars
PMCW_FLAGS_QF = 0x8000
PMCW_FLAGS_W = 0x4000
PMCW_FLAGS_ISC = 0x3800
PMCW_FLAGS_ISC_SHIFT = 11
PMCW_FLAGS_INVALID = 0x0700
PMCW_FLAGS_ENA = 0x0080                 # enabled for I/O
PMCW_FLAGS_LM = 0x0060
PMCW_FLAGS_MME = 0x0018
PMCW_FLAGS_MP = 0x0004
PMCW_FLAGS_TF = 0x0002
PMCW_FLAGS_DNV = 0x0001                 # device number valid
PMCW_CHARS_ST = 0x00E0_0000             # subchannel type (0: I/O)
PMCW_CHARS_MBFC = 0x0000_0004
PMCW_CHARS_XMWME = 0x0000_0002
PMCW_CHARS_CSENSE = 0x0000_0001         # concurrent sense
PMCW_CHARS_INVALID = 0xFF1F_FFF8

SCHIB_TAIL = struct.Struct(">Q4s")      # mba, mda
SCHIB_SIZE = PMCW.size + SCSW.size + SCHIB_TAIL.size    # 28 + 12 + 12 = 52

# ---- interruption response block -----------------------------------------------------------------
ESW_SIZE = 20
IRB_SIZE = SCSW.size + ESW_SIZE + SENSE_DATA_SIZE       # 64 (96 with extended measurements)
IRB_ESW0_NORMAL = 0x0080_0000           # the ERW's valid-LPUM bit, as QEMU stores it
IRB_ESW0_CHECK = 0x0480_4000
IRB_ESW1_SENSE = 0x0100_0000            # ERW: concurrent sense, count in bits 8..13

# ---- subchannel identifiers ----------------------------------------------------------------------
SCHID_ONE = 0x0001_0000                 # the "one" bit of a subchannel-identification word
SCHID_M = 0x0008_0000
SCHID_SSID = 0x0006_0000
SCHID_CSSID = 0xFF00_0000
SCHID_NR = 0x0000_FFFF
MAX_SCHID = 0xFFFF


def schid_word(sch_no: int, ssid: int = 0) -> int:
    """The subchannel-identification word of GPR1 (I/O instructions) and GPR2 (diagnose
    0x500): the one bit, the subchannel set, the subchannel number."""
    return SCHID_ONE | ssid << 17 | sch_no


def bus_id(devno: int, ssid: int = 0, cssid: int = 0) -> str:
    """The ccw bus id Linux names a device by ("0.0.0000")."""
    return f"{cssid:x}.{ssid:x}.{devno:04x}"


# ---- SENSE ID ------------------------------------------------------------------------------------
SENSE_ID = struct.Struct(">BHBHBB")     # reserved (0xff), cu_type, cu_model, dev_type,
#                                         dev_model, unused; then the CIWs
SENSE_ID_SIZE = 256                     # bytes 7..255: extended SenseId data (zeroes)
VIRTIO_CCW_CU_TYPE = 0x3832             # the virtio-ccw proxy's control unit type
VIRTIO_CCW_CHPID_TYPE = 0x32

# ---- virtio-ccw communication blocks -------------------------------------------------------------
VQ_CONFIG_BLOCK = struct.Struct(">HH")                # index, max_num
VQ_INFO_BLOCK = struct.Struct(">QIHHQQ")              # desc, res0, index, num, driver, device
VQ_INFO_BLOCK_LEGACY = struct.Struct(">QIHH")         # queue, align, index, num (revision 0)
FEATURE_DESC = struct.Struct("<IB")                   # le32 features, u8 index: 5 bytes
THININT_AREA = struct.Struct(">QQQB")                 # summary_indicator, indicator, bit_nr,
#                                                       isc: 25 bytes
REV_INFO = struct.Struct(">HH")                       # revision, length, then data[length]
INDICATOR_ADDR = struct.Struct(">Q")                  # the payload of SET_IND / SET_CONF_IND
STATUS_SIZE = 1                                       # WRITE_STATUS / READ_STATUS

VIRTIO_CCW_REV_MAX = 2          # 1: virtio 1; 2: adds CCW_CMD_READ_STATUS
VIRTIO_CCW_QUEUE_MAX = 1024     # QEMU's VIRTIO_QUEUE_MAX: the highest index READ_VQ_CONF takes
NR_CLASSIC_INDICATOR_BITS = 64
CONFIG_CHANGE_BIT = 0           # of the SET_CONF_IND indicator word
MAX_ISC = 7                     # interruption subclasses 0..7
VIRTIO_CCW_RING_ALIGN = 4096    # KVM_VIRTIO_CCW_RING_ALIGN
VIRTIO_CCW_CONFIG_SIZE = 0x100  # the driver's config buffer (as PCI's config space)
SUMMARY_INDICATOR_SET = 0x01    # what the device stores into the summary indicator

# ---- diagnose 0x500 ------------------------------------------------------------------------------
KVM_S390_VIRTIO_CCW_NOTIFY = 3  # the subcode in GPR1
