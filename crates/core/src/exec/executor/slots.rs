//! Where stages run: `--jobs` CPU permits, and the device slots (`--devices`) that GPU stages
//! and stages with `resources: {gpus: N}` hold while they run.
use crate::device::Device;
use crate::exec::error::SlotError;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The run's CPU permits and device pool.
pub(super) struct Slots {
    cpu: Arc<Semaphore>,
    gpus: Arc<DevicePool>,
}

impl Slots {
    /// `jobs` CPU permits and one device slot per entry of `devices` (repeats allowed).
    pub(super) fn new(jobs: usize, devices: &[Device]) -> Self {
        Self {
            cpu: Arc::new(Semaphore::new(jobs.max(1))),
            gpus: Arc::new(DevicePool {
                permits: Arc::new(Semaphore::new(devices.len())),
                free: Mutex::new(devices.iter().rev().copied().collect()),
                count: devices.len(),
            }),
        }
    }
}

struct DevicePool {
    free: Mutex<Vec<Device>>,
    permits: Arc<Semaphore>,
    /// Devices in the pool (the most one stage can hold).
    count: usize,
}

/// Held devices; returned to the pool on drop.
pub(super) struct DeviceSlot {
    pool: Arc<DevicePool>,
    devices: Vec<Device>,
    _permits: OwnedSemaphorePermit,
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(self.devices.drain(..).rev());
    }
}

/// A held CPU permit or device; released on drop.
#[allow(dead_code)] // the fields are held only for their Drop
pub(super) enum Slot {
    Cpu(OwnedSemaphorePermit),
    Gpu(DeviceSlot),
}

/// The slot a stage runs in: a CPU permit, or `device_slots` devices held together (taken
/// all at once, so two stages can never each hold part of what the other waits for). Returns
/// the slot and the devices held (empty for a CPU permit).
pub(super) async fn take_slot(
    slots: &Slots,
    device_slots: usize,
    stage_id: &str,
) -> Result<(Slot, Vec<Device>), SlotError> {
    let closed = |_| SlotError::Closed;
    if device_slots == 0 {
        let permit = slots.cpu.clone().acquire_owned().await.map_err(closed)?;
        return Ok((Slot::Cpu(permit), Vec::new()));
    }
    let available = slots.gpus.count;
    if device_slots > available {
        return Err(SlotError::TooManyDevices {
            stage_id: stage_id.to_string(),
            asked: device_slots,
            available,
        });
    }
    let permits = (slots.gpus.permits.clone())
        .acquire_many_owned(device_slots as u32)
        .await
        .map_err(closed)?;
    let devices: Vec<Device> = {
        let mut free = slots.gpus.free.lock().unwrap_or_else(|p| p.into_inner());
        let keep = free.len().saturating_sub(device_slots);
        free.split_off(keep).into_iter().rev().collect()
    };
    let held = devices.clone();
    Ok((
        Slot::Gpu(DeviceSlot {
            pool: slots.gpus.clone(),
            devices,
            _permits: permits,
        }),
        held,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stage_asking_for_more_devices_than_the_run_has_fails() {
        let slots = Slots::new(1, &[Device::Cuda(0), Device::Cuda(1)]);
        let Err(error) = take_slot(&slots, 3, "greedy").await else {
            panic!("three of two devices");
        };
        assert!(matches!(
            &error,
            SlotError::TooManyDevices { stage_id, asked: 3, available: 2 } if stage_id == "greedy"
        ));
        assert_eq!(
            error.to_string(),
            "stage `greedy` asks for 3 devices (`resources: {gpus: 3}`) but this run has 2 (--devices)"
        );
        let (_slot, held) = take_slot(&slots, 2, "fits").await.expect("two of two");
        assert_eq!(held, [Device::Cuda(0), Device::Cuda(1)]);
    }
}
