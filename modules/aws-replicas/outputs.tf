output "replicas" {
  description = "Per replica ID: endpoint (http://IP:PORT: the private IP when ingress is private only or public_ip is false, else the public IP when there is one), cloud_id (instance ID), private_ip, public_ip, zone (zone ID), availability_zone (name), subnet_id, subnet_default (whether that is its zone's default subnet) and market."
  value = {
    for id, inst in aws_instance.replica : id => {
      endpoint          = try("http://${var.private_endpoint ? inst.private_ip : coalesce(inst.public_ip, inst.private_ip)}:${var.port}", null)
      cloud_id          = try(inst.id, null)
      private_ip        = try(inst.private_ip, null)
      public_ip         = try(inst.public_ip, null)
      zone              = try(var.replicas[id].zone, null)
      availability_zone = try(inst.availability_zone, null)
      # the subnet it runs in, and whether that is its zone's default subnet: skyhedge pins a
      # replica to it only once the spec gives its zone another one (no input churn otherwise)
      subnet_id      = try(inst.subnet_id, null)
      subnet_default = try(data.aws_subnet.replica[local.replica_subnet[id]].default_for_az, null)
      market         = try(var.replicas[id].market, null)
    }
  }
}

output "security_group_id" {
  description = "The security group opening the model server port."
  value       = try(aws_security_group.replicas[local.vpc_id].id, null)
}
